// kvcached._vmm: the Python face of the compiled core (see docs/INTERFACES.md).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "arena.hpp"
#include "bench.hpp"
#include "cuda_backend.hpp"
#include "cuda_driver.hpp"
#include "errors.hpp"
#include "host_backend.hpp"

namespace nb = nanobind;
using namespace nb::literals;
using kvcached::Arena;
using kvcached::Backend;

namespace {

// "auto": one handle per page group where the backend can slice a handle into
// several ranges (host), one handle per range where it cannot (CUDA maps only
// from offset 0 of a handle).
kvcached::HandleMode parse_mode(const std::string& mode, const Backend& backend) {
  if (mode == "auto") {
    return std::string(backend.name()) == "cuda" ? kvcached::HandleMode::PerRange : kvcached::HandleMode::Group;
  }
  if (mode == "group") return kvcached::HandleMode::Group;
  if (mode == "per_range") return kvcached::HandleMode::PerRange;
  throw std::invalid_argument("handle_mode must be 'auto', 'group' or 'per_range', got '" + mode + "'");
}

std::uint64_t* word(std::uintptr_t addr) { return reinterpret_cast<std::uint64_t*>(addr); }

void check_word(std::uintptr_t addr) {
  if (addr == 0 || addr % alignof(std::uint64_t) != 0) {
    throw std::invalid_argument("addr must be a non-null 8-byte aligned address, got " + std::to_string(addr));
  }
}

}  // namespace

NB_MODULE(_vmm, m) {
  m.doc() = "kvcached's torch-free VMM core: host and CUDA backends and the page-group arena.";
  // Tensors that outlive interpreter shutdown still own arenas; that is not a
  // leak worth printing about (and the library prints nothing).
  nb::set_leak_warnings(false);

  nb::exception<kvcached::OutOfMemory>(m, "OutOfMemoryError", PyExc_MemoryError);
  nb::exception<kvcached::VmmError>(m, "VmmError", PyExc_RuntimeError);

  m.def(
      "backend_status",
      [] {
        return std::map<std::string, std::string>{{"host", "ok"}, {"cuda", kvcached::cuda_status()}};
      },
      "Which backends this build can use here: {'host': 'ok', 'cuda': 'ok' or why not}.");

  nb::class_<Backend>(m, "Backend")
      .def_prop_ro("name", [](const Backend& b) { return std::string(b.name()); })
      .def_prop_ro("device", &Backend::device)
      .def_prop_ro("granularity", &Backend::granularity)
      .def_prop_ro("uuid", &Backend::uuid)
      .def("mem_info", &Backend::mem_info, "(free_bytes, total_bytes) of the device's physical memory.")
      .def("reserve", &Backend::reserve, "size"_a, "alignment"_a = 0)
      .def("free_reserved", &Backend::free_reserved, "addr"_a, "size"_a)
      .def("create", &Backend::create, "size"_a)
      .def("release", &Backend::release, "handle"_a)
      .def("map", &Backend::map, "addr"_a, "size"_a, "handle"_a, "offset"_a = 0)
      .def("set_access", &Backend::set_access, "addr"_a, "size"_a)
      .def("unmap", &Backend::unmap, "addr"_a, "size"_a);

  nb::class_<kvcached::HostBackend, Backend>(m, "HostBackend")
      .def(nb::init<std::size_t, std::size_t>(), "cap_bytes"_a, "granularity"_a = std::size_t(2) << 20)
      .def_prop_ro("cap_bytes", &kvcached::HostBackend::cap_bytes)
      .def_prop_ro("created_bytes", &kvcached::HostBackend::created_bytes);

  nb::class_<kvcached::CudaBackend, Backend>(m, "CudaBackend")
      .def(nb::init<int>(), "device"_a = 0)
      .def_prop_ro("device_name", &kvcached::CudaBackend::device_name)
      .def_prop_ro("driver_version", &kvcached::CudaBackend::driver_version);

  nb::class_<Arena>(m, "Arena")
      .def(
          "__init__",
          [](Arena* self, Backend* backend, std::size_t num_ranges, std::size_t range_bytes, std::size_t page_bytes,
             const std::string& handle_mode) {
            new (self) Arena(backend, num_ranges, range_bytes, page_bytes, parse_mode(handle_mode, *backend));
          },
          "backend"_a, "num_ranges"_a, "range_bytes"_a, "page_bytes"_a, "handle_mode"_a = "auto",
          nb::keep_alive<1, 2>())
      .def("map", &Arena::map, "page_ids"_a, nb::call_guard<nb::gil_scoped_release>(),
           "Map page groups, all or nothing. Raises OutOfMemoryError, VmmError or ValueError.")
      .def("unmap", &Arena::unmap, "page_ids"_a, nb::call_guard<nb::gil_scoped_release>(),
           "Unmap and release page groups. Raises VmmError or ValueError.")
      .def("close", &Arena::close, nb::call_guard<nb::gil_scoped_release>())
      .def("is_mapped", &Arena::is_mapped, "page_id"_a)
      .def("mapped_pages", &Arena::mapped_pages)
      .def("range_addr", &Arena::range_addr, "range"_a)
      .def(
          "set_ledger",
          [](Arena& a, std::uintptr_t slot_mapped, std::uintptr_t gpu_mapped, std::uintptr_t gpu_budget,
             std::size_t headroom_bytes) {
            a.set_ledger(kvcached::Ledger{word(slot_mapped), word(gpu_mapped), word(gpu_budget), headroom_bytes});
          },
          "slot_mapped_addr"_a, "gpu_mapped_addr"_a, "gpu_budget_addr"_a, "headroom_bytes"_a = 0)
      .def("clear_ledger", &Arena::clear_ledger)
      .def_prop_ro("num_mapped_pages", &Arena::num_mapped_pages)
      .def_prop_ro("mapped_bytes", &Arena::mapped_bytes)
      .def_prop_ro("base_addr", &Arena::base_addr)
      .def_prop_ro("num_ranges", &Arena::num_ranges)
      .def_prop_ro("range_bytes", &Arena::range_bytes)
      .def_prop_ro("page_bytes", &Arena::page_bytes)
      .def_prop_ro("num_pages", &Arena::num_pages)
      .def_prop_ro("group_bytes", &Arena::group_bytes)
      .def_prop_ro("closed", &Arena::closed)
      .def_prop_ro("handle_mode", [](const Arena& a) {
        return std::string(a.handle_mode() == kvcached::HandleMode::Group ? "group" : "per_range");
      });

  m.def(
      "dlpack_bytes",
      [](std::uintptr_t addr, std::size_t num_bytes, const std::string& device, int device_id, nb::handle owner) {
        std::int32_t type;
        if (device == "cpu") {
          type = nb::device::cpu::value;
        } else if (device == "cuda") {
          type = nb::device::cuda::value;
        } else {
          throw std::invalid_argument("device must be 'cpu' or 'cuda', got '" + device + "'");
        }
        std::size_t shape[1] = {num_bytes};
        return nb::ndarray<std::uint8_t, nb::ndim<1>>(reinterpret_cast<void*>(addr), 1, shape, owner, nullptr,
                                                      nb::dtype<std::uint8_t>(), type, device_id);
      },
      "addr"_a, "num_bytes"_a, "device"_a, "device_id"_a = 0, "owner"_a = nb::none(),
      "A 1-D uint8 DLPack-exporting view of [addr, addr + num_bytes) on the given device; zero-copy. "
      "`owner` is kept alive as long as any view of it.");

  // Atomics on 8-byte words of shared memory, for the control plane's few
  // read-modify-writes (Python has none of its own).
  m.def(
      "atomic_fetch_add_u64",
      [](std::uintptr_t addr, std::int64_t delta) {
        check_word(addr);
        return __atomic_fetch_add(word(addr), static_cast<std::uint64_t>(delta), __ATOMIC_SEQ_CST);
      },
      "addr"_a, "delta"_a, "Add a (two's-complement) delta to the uint64 at addr; return the old value.");
  m.def(
      "atomic_load_u64",
      [](std::uintptr_t addr) {
        check_word(addr);
        return __atomic_load_n(word(addr), __ATOMIC_ACQUIRE);
      },
      "addr"_a);
  m.def(
      "atomic_store_u64",
      [](std::uintptr_t addr, std::uint64_t value) {
        check_word(addr);
        __atomic_store_n(word(addr), value, __ATOMIC_RELEASE);
      },
      "addr"_a, "value"_a);
  m.def(
      "atomic_cas_u64",
      [](std::uintptr_t addr, std::uint64_t expected, std::uint64_t desired) {
        check_word(addr);
        return __atomic_compare_exchange_n(word(addr), &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
      },
      "addr"_a, "expected"_a, "desired"_a, "Compare-and-swap the uint64 at addr; True when it was swapped.");

  m.def("bench_raw", &kvcached::bench_raw, "backend"_a, "page_bytes"_a, "iterations"_a,
        nb::call_guard<nb::gil_scoped_release>(),
        "Per-call nanoseconds of raw create/map/set_access/unmap/release on `backend`.");
}
