#include "bench.hpp"

#include <chrono>

namespace kvcached {

std::map<std::string, std::vector<double>> bench_raw(Backend& backend, std::size_t page_bytes, int iterations) {
  using clock = std::chrono::steady_clock;
  std::map<std::string, std::vector<double>> ns;
  for (const char* key : {"create", "map", "set_access", "unmap", "release"}) ns[key].reserve(iterations);
  std::size_t alignment = page_bytes & (~page_bytes + 1);
  if (alignment < backend.granularity()) alignment = backend.granularity();
  const std::uintptr_t addr = backend.reserve(page_bytes, alignment);
  auto lap = [&](const char* key, auto&& call) {
    const auto t0 = clock::now();
    call();
    ns[key].push_back(std::chrono::duration<double, std::nano>(clock::now() - t0).count());
  };
  try {
    for (int i = 0; i < iterations; ++i) {
      Handle h = 0;
      lap("create", [&] { h = backend.create(page_bytes); });
      lap("map", [&] { backend.map(addr, page_bytes, h, 0); });
      lap("set_access", [&] { backend.set_access(addr, page_bytes); });
      lap("unmap", [&] { backend.unmap(addr, page_bytes); });
      lap("release", [&] { backend.release(h); });
    }
  } catch (...) {
    backend.free_reserved(addr, page_bytes);
    throw;
  }
  backend.free_reserved(addr, page_bytes);
  return ns;
}

}  // namespace kvcached
