// The scheduler behind emu.h: blocks in order, a block's threads as ucontext fibers on this OS thread.
// Compiled without emu.h's macros (it is the runtime, not a kernel).
#define EMU_RUNTIME
#include "emu.h"

#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace emu {

uint3 thread_idx, block_idx;
dim3 block_dim, grid_dim;
unsigned char* dynamic_smem = nullptr;

namespace {

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int linear = 0;
  State state = State::kRunnable;
};

constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned kMaxThreads = 1024;
constexpr size_t kMaxSmem = 48 * 1024;  // without cudaFuncSetAttribute's opt-in

ucontext_t scheduler;
std::vector<Fiber> fibers;
std::vector<std::unique_ptr<char[]>> stacks;  // kStackBytes each, touched only as deep as a thread goes
std::vector<unsigned long long> slots;
std::vector<unsigned char> smem_buffer;
int current = -1;
const std::function<void()>* body = nullptr;
cudaError_t last_error = cudaSuccess;
std::string failure;  // an exception thrown by a kernel thread, rethrown after the launch

void trampoline() {
  try {
    (*body)();
  } catch (const std::exception& e) {
    if (failure.empty()) failure = e.what();
  }
  fibers[current].state = State::kDone;
  // uc_link returns to the scheduler
}

void yield_as(State s) {
  if (current < 0) throw std::logic_error("emu: barrier outside a kernel");
  Fiber& f = fibers[current];
  f.state = s;
  swapcontext(&f.ctx, &scheduler);
}

// run every runnable fiber until none is; then release a barrier every live thread it concerns has reached.
// The threads run in ascending order in one round and descending in the next (starting with `descending`),
// so that a missing barrier shows whichever way the data flows between threads.
void run_block(bool descending) {
  const int n = static_cast<int>(fibers.size());
  for (;; descending = !descending) {
    for (int k = 0; k < n; ++k) {
      const int i = descending ? n - 1 - k : k;
      while (fibers[i].state == State::kRunnable) {
        current = i;
        thread_idx = fibers[i].tid;
        swapcontext(&scheduler, &fibers[i].ctx);
      }
    }
    current = -1;
    bool released = false;
    for (int w = 0; w < n; w += 32) {  // warps whose live lanes all wait at a warp barrier
      bool all = true, any = false;
      for (int i = w; i < n && i < w + 32; ++i) {
        if (fibers[i].state == State::kDone) continue;
        any = true;
        all = all && fibers[i].state == State::kAtWarpBarrier;
      }
      if (any && all) {
        for (int i = w; i < n && i < w + 32; ++i)
          if (fibers[i].state == State::kAtWarpBarrier) fibers[i].state = State::kRunnable;
        released = true;
      }
    }
    if (released) continue;
    bool all_block = true, any_live = false;
    for (const Fiber& f : fibers) {
      if (f.state == State::kDone) continue;
      any_live = true;
      all_block = all_block && f.state == State::kAtBlockBarrier;
    }
    if (!any_live) return;
    if (!all_block)
      throw std::runtime_error("emu: deadlock (threads wait at different barriers: divergent __syncthreads "
                               "or a partial-warp shuffle)");
    for (Fiber& f : fibers) f.state = State::kRunnable;
  }
}

}  // namespace

int lane() { return fibers[current].linear % 32; }

unsigned long long* warp_slots() { return slots.data(); }

void syncthreads() { yield_as(State::kAtBlockBarrier); }

void syncwarp() { yield_as(State::kAtWarpBarrier); }

std::string launch_log;  // emu_launches(): the kernels launched since it was last read

void record_launch(const char* name) {
  launch_log += name;
  launch_log += '\n';
}

cudaError_t get_last_error(bool clear) {
  const cudaError_t e = last_error;
  if (clear) last_error = cudaSuccess;
  return e;
}

void run(const Config& c, const std::function<void()>& fn) {
  const unsigned long long threads = 1ull * c.block.x * c.block.y * c.block.z;
  if (threads == 0 || threads > kMaxThreads || c.block.z > 64 || c.grid.x == 0 || c.grid.y == 0 ||
      c.grid.z == 0 || c.grid.y > 65535 || c.grid.z > 65535) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (c.smem > kMaxSmem) {
    last_error = cudaErrorInvalidValue;
    return;
  }
  while (stacks.size() < threads) stacks.emplace_back(new char[kStackBytes]);
  smem_buffer.resize(c.smem + 16);
  dynamic_smem = smem_buffer.data() + (16 - reinterpret_cast<uintptr_t>(smem_buffer.data()) % 16) % 16;
  slots.assign(threads, 0);
  grid_dim = c.grid;
  block_dim = c.block;
  body = &fn;
  failure.clear();
  for (unsigned bz = 0; bz < c.grid.z; ++bz)
    for (unsigned by = 0; by < c.grid.y; ++by)
      for (unsigned bx = 0; bx < c.grid.x; ++bx) {
        block_idx = make_uint3(bx, by, bz);
        std::fill(smem_buffer.begin(), smem_buffer.end(), 0xA5);  // garbage, as each block's shared memory starts
        fibers.assign(threads, Fiber{});
        int i = 0;
        for (unsigned z = 0; z < c.block.z; ++z)
          for (unsigned y = 0; y < c.block.y; ++y)
            for (unsigned x = 0; x < c.block.x; ++x, ++i) {
              Fiber& f = fibers[i];
              f.tid = make_uint3(x, y, z);
              f.linear = i;
              getcontext(&f.ctx);
              f.ctx.uc_stack.ss_sp = stacks[i].get();
              f.ctx.uc_stack.ss_size = kStackBytes;
              f.ctx.uc_link = &scheduler;
              makecontext(&f.ctx, trampoline, 0);
            }
        run_block((bx + by + bz) % 2 == 1);
        if (!failure.empty()) throw std::runtime_error(failure);
      }
}

}  // namespace emu
