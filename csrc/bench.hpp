// Timings of the raw backend calls, made in C++ so the reference path carries
// no Python overhead. Used by scripts/bench_vmm.py to hold the arena against
// the driver floor in the same process.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "backend.hpp"

namespace kvcached {

// For `iterations` rounds: create a `page_bytes` handle, map it into a
// reserved range, set access, unmap, release; each call timed on its own.
// Returns per-call nanoseconds keyed "create", "map", "set_access", "unmap",
// "release". Throws what the backend throws (after cleaning up).
std::map<std::string, std::vector<double>> bench_raw(Backend& backend, std::size_t page_bytes, int iterations);

}  // namespace kvcached
