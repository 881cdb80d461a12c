// The CPU emulator behind cuda_emu.h: coroutine scheduler, barriers, warp collectives (PTX ISA
// fragment layouts), cp.async queues, and the few CUDA runtime calls csrc/cuda makes.
#include "cuda_emu.h"

#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// The sanitizer build (tests/cuda_emu/build.py, RAL_EMU_SANITIZE=address): the coroutine switches
// are announced to ASan as fiber switches, a coroutine stack is unpoisoned before it is reused, and
// the shared-memory bytes past the launch's dynamic size are poisoned, so that any access to them
// (plain loads and stores included) is reported where it happens.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define RAL_EMU_ASAN 1
#endif

namespace ral_emu {

ThreadCtx* g_thread = nullptr;
BlockCtx g_block;

namespace {

// ---- context switch ------------------------------------------------------------------------
#if defined(__x86_64__)
extern "C" void ral_emu_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.p2align 4
.hidden ral_emu_switch
.globl ral_emu_switch
.type ral_emu_switch,@function
ral_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size ral_emu_switch,.-ral_emu_switch
)");
#endif

constexpr size_t kStackBytes = 512 * 1024;
constexpr size_t kSmemMax = 256 * 1024, kCanary = 4096;

enum State { kRunnable, kAtBarrier, kAtWarp, kDone };
enum Op { kNone, kMmaF16, kMmaBF16, kLdm, kLdmT, kShflF, kShflI };
const char* op_name(int op) {
  static const char* names[] = {"none", "mma.f16", "mma.bf16", "ldmatrix.x4", "ldmatrix.x4.trans", "shfl.f32",
                                "shfl.b32"};
  return names[op];
}

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int n;
  bool landed;  // RAL_EMU_CP_ASYNC=early: the bytes are there, the copy is still owed a wait
};

// Race bookkeeping per 16 bytes of dynamic shared memory, for the accesses the emulator sees
// (cp.async writes, ldmatrix reads); `epoch` counts the block's barriers.
struct Chunk {
  int pending = 0;        // cp.async copies into it not yet completed by a wait
  int w_thread = -1;      // the thread whose copy completed last, and in which epoch
  int w_epoch = -1;
  int r_epoch = -1;       // the epoch of the last ldmatrix reads, and the warps that read
  uint32_t r_warps = 0;
};

struct Thread : ThreadCtx {
  int id = 0;
  State state = kDone;
  void* sp = nullptr;
  unsigned char* stack = nullptr;
  void* asan_fake = nullptr;  // ASan's fake stack of this coroutine while it is switched out
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
  std::vector<Copy> open;                  // issued, not yet committed
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
};

struct Warp {
  int arrived = 0;
  Op op = kNone;
  uint32_t a[32][4], b[32][2], res[32][4];
  float c[32][4];
  const unsigned char* addr[32];
  uint32_t shfl_v[32];
  int shfl_m[32];
};

struct Emu {
  std::mutex mutex;  // one launch at a time
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<uint64_t> runnable;
  int n = 0, alive = 0, bar_arrived = 0, bar_or = 0, bar_result = 0, epoch = 0;
  std::vector<Chunk> chunks;
  std::vector<std::pair<uintptr_t, uintptr_t>> allowed;  // global ranges cp.async may read (empty: any)
  void* sched_sp = nullptr;
  void* sched_fake = nullptr;  // ASan: the scheduler's fake stack and stack bounds
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
#if !defined(__x86_64__)
  ucontext_t sched_uc;
#endif
  bool failed = false;
  std::string error;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  int policy = 0;  // 0 forward, 1 reverse, 2 random
  bool cp_early = false;
  std::mt19937_64 rng;
  const std::function<void()>* body = nullptr;
  std::map<const void*, int> max_dyn_smem;
  cudaError_t last_error = cudaSuccess;
  std::string log;
  long long switches = 0;
};
Emu E;

long env_long(const char* name, long dflt) {
  const char* s = std::getenv(name);
  return s && *s ? std::strtol(s, nullptr, 0) : dflt;
}
std::string env_str(const char* name, const char* dflt) {
  const char* s = std::getenv(name);
  return s && *s ? s : dflt;
}

Thread* cur() { return static_cast<Thread*>(g_thread); }

void set_bit(int i) { E.runnable[i >> 6] |= uint64_t(1) << (i & 63); }
void clear_bit(int i) { E.runnable[i >> 6] &= ~(uint64_t(1) << (i & 63)); }

// ASan fiber annotations (no-ops in the normal build). `final`: the coroutine never resumes.
inline void asan_leave_thread(Thread* t, bool final) {
#if defined(RAL_EMU_ASAN)
  __sanitizer_start_switch_fiber(final ? nullptr : &t->asan_fake, E.sched_bottom, E.sched_size);
#else
  (void)t, (void)final;
#endif
}
inline void asan_enter_thread(Thread* t) {  // on the coroutine's stack, right after the switch
#if defined(RAL_EMU_ASAN)
  __sanitizer_finish_switch_fiber(t ? t->asan_fake : nullptr, &E.sched_bottom, &E.sched_size);
#else
  (void)t;
#endif
}

void to_scheduler(Thread* t, bool final = false) {
  ++E.switches;
  asan_leave_thread(t, final);
#if defined(__x86_64__)
  ral_emu_switch(&t->sp, E.sched_sp);
#else
  swapcontext(&t->uc, &E.sched_uc);
#endif
  asan_enter_thread(t);
}

[[noreturn]] void fail_here(const std::string& msg) {
  Thread* t = cur();
  if (!E.failed) {
    E.failed = true;
    char where[160];
    std::snprintf(where, sizeof(where), " (block %u,%u,%u thread %d)", g_block.block_idx.x, g_block.block_idx.y,
                  g_block.block_idx.z, t ? t->id : -1);
    E.error = "cuda_emu: " + msg + where;
  }
  t->state = kDone;
  clear_bit(t->id);
  to_scheduler(t, true);
  std::abort();  // never resumed
}

void block_here(Thread* t, State s) {
  t->state = s;
  clear_bit(t->id);
  to_scheduler(t);
}

// ---- cp.async ----------------------------------------------------------------------------------
Chunk& chunk(const void* p) { return E.chunks[size_t(static_cast<const unsigned char*>(p) - E.smem) / 16]; }

void land(const Copy& c) {
  if (c.n > 0) std::memcpy(c.dst, c.src, size_t(c.n));
  if (c.n < 16) std::memset(c.dst + c.n, 0, size_t(16 - c.n));
}
// The copy is complete for its thread t (a wait, or t's exit).
void perform(const Copy& c, int t) {
  if (!c.landed) land(c);
  Chunk& k = chunk(c.dst);
  --k.pending;
  k.w_thread = t;
  k.w_epoch = E.epoch;
}
void flush_all(Thread* t) {
  for (auto& g : t->groups)
    for (auto& c : g) perform(c, t->id);
  for (auto& c : t->open) perform(c, t->id);
  t->groups.clear();
  t->open.clear();
}

bool in_smem(const void* p, size_t bytes) {
  auto a = reinterpret_cast<const unsigned char*>(p);
  return a >= E.smem && a + bytes <= E.smem + E.smem_bytes;
}

void thread_main() {
  Thread* t = cur();
  asan_enter_thread(nullptr);  // first entry: no fake stack to restore yet
  (*E.body)();
  flush_all(t);  // copies still in flight at exit
  t->state = kDone;
  clear_bit(t->id);
  --E.alive;
  to_scheduler(t, true);
  std::abort();
}

#if defined(__x86_64__)
extern "C" void ral_emu_entry() { thread_main(); }
void init_context(Thread& t) {
#if defined(RAL_EMU_ASAN)
  // frames of the coroutine's last run stay poisoned (it never returned): clear them
  __asan_unpoison_memory_region(t.stack + 4096, kStackBytes - 4096);
  t.asan_fake = nullptr;
#endif
  uintptr_t top = (reinterpret_cast<uintptr_t>(t.stack) + kStackBytes) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<void**>(top - 64);  // 16-aligned: entry sees rsp % 16 == 8
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;    // r15 r14 r13 r12 rbx rbp
  sp[6] = reinterpret_cast<void*>(&ral_emu_entry);
  sp[7] = nullptr;
  t.sp = sp;
}
#else
void init_context(Thread& t) {
#if defined(RAL_EMU_ASAN)
  __asan_unpoison_memory_region(t.stack + 4096, kStackBytes - 4096);
  t.asan_fake = nullptr;
#endif
  getcontext(&t.uc);
  t.uc.uc_stack.ss_sp = t.stack;
  t.uc.uc_stack.ss_size = kStackBytes;
  t.uc.uc_link = nullptr;
  makecontext(&t.uc, &thread_main, 0);
}
#endif

void resume(Thread& t) {
  g_thread = &t;
#if defined(RAL_EMU_ASAN)
  __sanitizer_start_switch_fiber(&E.sched_fake, t.stack + 4096, kStackBytes - 4096);
#endif
#if defined(__x86_64__)
  ral_emu_switch(&E.sched_sp, t.sp);
#else
  swapcontext(&E.sched_uc, &t.uc);
#endif
#if defined(RAL_EMU_ASAN)
  __sanitizer_finish_switch_fiber(E.sched_fake, nullptr, nullptr);
#endif
}

int pick() {
  const int words = int(E.runnable.size());
  if (E.policy == 0) {
    for (int w = 0; w < words; ++w)
      if (E.runnable[w]) return w * 64 + __builtin_ctzll(E.runnable[w]);
  } else if (E.policy == 1) {
    for (int w = words - 1; w >= 0; --w)
      if (E.runnable[w]) return w * 64 + 63 - __builtin_clzll(E.runnable[w]);
  } else {
    int count = 0;
    for (int w = 0; w < words; ++w) count += __builtin_popcountll(E.runnable[w]);
    if (count == 0) return -1;
    int r = int(E.rng() % uint64_t(count));
    for (int w = 0; w < words; ++w) {
      uint64_t bits = E.runnable[w];
      const int c = __builtin_popcountll(bits);
      if (r >= c) { r -= c; continue; }
      for (; r > 0; --r) bits &= bits - 1;
      return w * 64 + __builtin_ctzll(bits);
    }
  }
  return -1;
}

std::string deadlock_report() {
  std::string s = "deadlock:";
  int at_bar = 0, done = 0;
  for (auto& t : E.threads) at_bar += t.state == kAtBarrier, done += t.state == kDone;
  s += " " + std::to_string(at_bar) + " threads at __syncthreads, " + std::to_string(done) + " exited";
  for (size_t w = 0; w < E.warps.size(); ++w)
    if (E.warps[w].arrived)
      s += ", warp " + std::to_string(w) + ": " + std::to_string(E.warps[w].arrived) + "/32 lanes at " +
           op_name(E.warps[w].op);
  return s;
}

float h2f(uint16_t bits, int kind) {
  if (kind == kMmaBF16) {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}

// All 32 lanes of the warp have deposited their operands: every lane's result.
// Layouts from the PTX ISA ("Matrix fragments for mma.m16n8k16 with floating point type" and
// "ldmatrix"), with g = lane / 4 (groupID) and t = lane % 4 (threadID_in_group); in a 32-bit
// register of two 16-bit elements the lower half holds the element with the lower index.
void compute(Warp& w) {
  if (w.op == kMmaF16 || w.op == kMmaBF16) {
    float A[16][16], B[16][8], D[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      for (int r = 0; r < 4; ++r) {  // a0..a7: regs (row g | g+8) x (cols 2t.. | 2t+8..)
        const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
        A[row][col] = h2f(uint16_t(w.a[l][r]), w.op);
        A[row][col + 1] = h2f(uint16_t(w.a[l][r] >> 16), w.op);
      }
      for (int r = 0; r < 2; ++r) {  // b0..b3: rows k = 2t, 2t+1 (+8 for reg 1), col n = g
        B[2 * t + 8 * r][g] = h2f(uint16_t(w.b[l][r]), w.op);
        B[2 * t + 8 * r + 1][g] = h2f(uint16_t(w.b[l][r] >> 16), w.op);
      }
      for (int e = 0; e < 4; ++e) D[g + 8 * (e >> 1)][2 * t + (e & 1)] = w.c[l][e];  // c0..c3
    }
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 8; ++j) {
        float acc = D[i][j];
        for (int k = 0; k < 16; ++k) acc += A[i][k] * B[k][j];
        D[i][j] = acc;
      }
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      for (int e = 0; e < 4; ++e) {
        const float d = D[g + 8 * (e >> 1)][2 * t + (e & 1)];
        std::memcpy(&w.res[l][e], &d, 4);
      }
    }
  } else if (w.op == kLdm || w.op == kLdmT) {
    // lanes 8m .. 8m+7 hold the addresses of rows 0..7 of matrix m (16 bytes each); lane l receives
    // row l/4, cols 2(l%4), 2(l%4)+1 of matrix m in r[m] (.trans: rows 2(l%4), 2(l%4)+1 of col l/4)
    uint16_t M[4][8][8];
    for (int l = 0; l < 32; ++l) std::memcpy(M[l >> 3][l & 7], w.addr[l], 16);
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      for (int m = 0; m < 4; ++m) {
        const uint16_t lo = w.op == kLdm ? M[m][g][2 * t] : M[m][2 * t][g];
        const uint16_t hi = w.op == kLdm ? M[m][g][2 * t + 1] : M[m][2 * t + 1][g];
        w.res[l][m] = uint32_t(lo) | (uint32_t(hi) << 16);
      }
    }
  } else {  // shfl.bfly: lane l reads lane l ^ m
    for (int l = 0; l < 32; ++l) w.res[l][0] = w.shfl_v[l ^ (w.shfl_m[l] & 31)];
  }
}

// Deposit, rendezvous, and return this lane's slot; `deposit(w, lane)` writes the operands.
template <typename Deposit>
Warp& collective(Op op, Deposit&& deposit) {
  Thread* t = cur();
  if (E.n % 32) fail_here("warp collective in a block of " + std::to_string(E.n) + " threads");
  Warp& w = E.warps[t->id >> 5];
  const int lane = t->id & 31;
  if (w.arrived == 0) w.op = op;
  else if (w.op != op)
    fail_here(std::string("divergent warp collective: lane ") + std::to_string(lane) + " at " + op_name(op) +
              " while others are at " + op_name(w.op));
  deposit(w, lane);
  if (++w.arrived == 32) {
    compute(w);
    w.arrived = 0;
    const int base = t->id & ~31;
    for (int l = 0; l < 32; ++l)
      if (E.threads[base + l].state == kAtWarp) {
        E.threads[base + l].state = kRunnable;
        set_bit(base + l);
      }
  } else {
    block_here(t, kAtWarp);
  }
  return w;
}

}  // namespace

// ---- device-side API ---------------------------------------------------------------------------
void syncthreads() { syncthreads_or(0); }

int syncthreads_or(int pred) {
  Thread* t = cur();
  E.bar_or |= pred != 0;
  if (++E.bar_arrived == E.n) {
    E.bar_result = E.bar_or;
    E.bar_arrived = 0;
    E.bar_or = 0;
    ++E.epoch;
    for (auto& u : E.threads)
      if (u.state == kAtBarrier) {
        u.state = kRunnable;
        set_bit(u.id);
      }
    // the last arrival yields too, so that who runs first after a barrier follows the schedule
    to_scheduler(t);
  } else {
    block_here(t, kAtBarrier);
  }
  return E.bar_result;
}

float shfl_xor(uint32_t mask, float x, int lane_mask) {
  if (mask != 0xffffffffu) fail_here("__shfl_xor_sync: only the full mask is emulated");
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const int lane = cur()->id & 31;
  Warp& w = collective(kShflF, [&](Warp& w, int l) { w.shfl_v[l] = bits, w.shfl_m[l] = lane_mask; });
  float out;
  std::memcpy(&out, &w.res[lane][0], 4);
  return out;
}

int shfl_xor(uint32_t mask, int x, int lane_mask) {
  if (mask != 0xffffffffu) fail_here("__shfl_xor_sync: only the full mask is emulated");
  const int lane = cur()->id & 31;
  Warp& w = collective(kShflI, [&](Warp& w, int l) { w.shfl_v[l] = uint32_t(x), w.shfl_m[l] = lane_mask; });
  return int(w.res[lane][0]);
}

void mma_m16n8k16(int kind, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int lane = cur()->id & 31;
  Warp& w = collective(kind == 2 ? kMmaBF16 : kMmaF16, [&](Warp& w, int l) {
    for (int i = 0; i < 4; ++i) w.a[l][i] = a[i], w.c[l][i] = c[i];
    w.b[l][0] = b0;
    w.b[l][1] = b1;
  });
  for (int i = 0; i < 4; ++i) std::memcpy(&c[i], &w.res[lane][i], 4);
}

void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr, bool trans) {
  if (reinterpret_cast<uintptr_t>(row_addr) % 16) fail_here("ldmatrix: row address not 16-byte aligned");
  if (!in_smem(row_addr, 16)) fail_here("ldmatrix: row address outside the block's dynamic shared memory");
  {
    Thread* t = cur();
    Chunk& k = chunk(row_addr);
    if (k.pending)
      fail_here("race: ldmatrix reads shared memory that a cp.async still in flight writes (no wait_group before it)");
    if (k.w_epoch == E.epoch && k.w_thread != t->id)
      fail_here("race: ldmatrix reads shared memory that thread " + std::to_string(k.w_thread) +
                "'s cp.async wrote with no __syncthreads in between");
    if (k.r_epoch != E.epoch) k.r_epoch = E.epoch, k.r_warps = 0;
    k.r_warps |= 1u << (t->id >> 5);
  }
  const int lane = cur()->id & 31;
  Warp& w = collective(trans ? kLdmT : kLdm,
                       [&](Warp& w, int l) { w.addr[l] = static_cast<const unsigned char*>(row_addr); });
  for (int i = 0; i < 4; ++i) r[i] = w.res[lane][i];
}

void cp_async16(void* dst, const void* src, int src_size) {
  if (src_size < 0 || src_size > 16) fail_here("cp.async: src-size must be 0..16");
  if (reinterpret_cast<uintptr_t>(dst) % 16 || (src_size > 0 && reinterpret_cast<uintptr_t>(src) % 16))
    fail_here("cp.async: 16-byte copy with an address not 16-byte aligned");
  if (!in_smem(dst, 16)) fail_here("cp.async: destination outside the block's dynamic shared memory");
  if (src_size > 0 && !E.allowed.empty()) {
    const auto lo = reinterpret_cast<uintptr_t>(src), hi = lo + uintptr_t(src_size);
    bool ok = false;
    for (auto& r : E.allowed) ok = ok || (lo >= r.first && hi <= r.second);
    if (!ok) fail_here("cp.async reads global memory outside the extent of every input view");
  }
  Thread* t = cur();
  Chunk& k = chunk(dst);
  if (k.pending) fail_here("race: two cp.async copies in flight into the same 16 bytes of shared memory");
  if (k.r_epoch == E.epoch && (k.r_warps & ~(1u << (t->id >> 5))))
    fail_here("race: cp.async overwrites shared memory that another warp read with no __syncthreads in between");
  ++k.pending;
  Copy c{static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), src_size, E.cp_early};
  if (c.landed) land(c);
  t->open.push_back(c);
}

void cp_async_commit() {
  Thread* t = cur();
  t->groups.push_back(std::move(t->open));
  t->open.clear();
}

void cp_async_wait(int n) {
  Thread* t = cur();
  while (int(t->groups.size()) > n) {
    for (auto& c : t->groups.front()) perform(c, t->id);
    t->groups.erase(t->groups.begin());
  }
}

unsigned char* dynamic_smem() { return E.smem; }

// ---- launches -----------------------------------------------------------------------------------
void run_grid(const void* kernel, const LaunchConfig& cfg, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(E.mutex);
  const long nthreads = long(cfg.block.x) * cfg.block.y * cfg.block.z;
  const int optin = int(env_long("RAL_EMU_SMEM_OPTIN", 232448));
  auto it = E.max_dyn_smem.find(kernel);
  const long allowed = it == E.max_dyn_smem.end() ? 48 * 1024 : std::max(it->second, 48 * 1024);
  if (nthreads <= 0 || nthreads > 1024 || cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0 ||
      cfg.grid.y > 65535 || cfg.grid.z > 65535 || cfg.grid.x > 0x7fffffffu) {
    E.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (long(cfg.smem) > allowed || long(cfg.smem) > optin || cfg.smem + kCanary > kSmemMax + kCanary) {
    E.last_error = cudaErrorInvalidValue;
    return;
  }
  const std::string sched = env_str("RAL_EMU_SCHEDULE", "forward");
  E.policy = sched == "reverse" ? 1 : sched.rfind("random", 0) == 0 ? 2 : 0;
  if (E.policy == 2) E.rng.seed(sched.size() > 7 ? std::strtoull(sched.c_str() + 7, nullptr, 0) : 0);
  E.cp_early = env_str("RAL_EMU_CP_ASYNC", "late") == "early";
  if (!E.smem) E.smem = static_cast<unsigned char*>(std::aligned_alloc(128, kSmemMax + kCanary));
  E.smem_bytes = cfg.smem;
  E.n = int(nthreads);
  if (E.threads.size() < size_t(E.n)) {
    const size_t old = E.threads.size();
    E.threads.resize(size_t(E.n));
    for (size_t i = old; i < E.threads.size(); ++i) {
      void* m = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (m == MAP_FAILED) std::abort();
      mprotect(m, 4096, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
      E.threads[i].stack = static_cast<unsigned char*>(m);
    }
  }
  E.warps.assign(size_t((E.n + 31) / 32), Warp{});
  E.runnable.assign(size_t((E.n + 63) / 64), 0);
  E.body = &body;
  E.failed = false;
  E.error.clear();
  char line[200];
  std::snprintf(line, sizeof(line), "launch grid=%u,%u,%u block=%ld smem=%zu\n", cfg.grid.x, cfg.grid.y,
                cfg.grid.z, nthreads, cfg.smem);
  E.log += line;

  const long blocks = long(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
  const std::string border = env_str("RAL_EMU_BLOCK_ORDER", sched.c_str());
  const int bpol = border == "reverse" ? 1 : border.rfind("random", 0) == 0 ? 2 : 0;
  std::vector<long> order(static_cast<size_t>(blocks));
  for (long i = 0; i < blocks; ++i) order[size_t(i)] = bpol == 1 ? blocks - 1 - i : i;
  if (bpol == 2) std::shuffle(order.begin(), order.end(), E.rng);
  g_block.block_dim = cfg.block;
  g_block.grid_dim = cfg.grid;
  for (long bi : order) {
    g_block.block_idx = uint3{unsigned(bi % cfg.grid.x), unsigned(bi / cfg.grid.x % cfg.grid.y),
                              unsigned(bi / cfg.grid.x / cfg.grid.y)};
#if defined(RAL_EMU_ASAN)
    __asan_unpoison_memory_region(E.smem, kSmemMax + kCanary);
#endif
    std::memset(E.smem, 0xff, E.smem_bytes);                  // uninitialised shared memory: NaN
    std::memset(E.smem + E.smem_bytes, 0xa5, kCanary);       // canary after the launch's bytes
#if defined(RAL_EMU_ASAN)
    __asan_poison_memory_region(E.smem + E.smem_bytes, kSmemMax + kCanary - E.smem_bytes);
#endif
    for (int i = 0; i < E.n; ++i) {
      Thread& t = E.threads[size_t(i)];
      t.id = i;
      t.thread_idx = uint3{unsigned(i % cfg.block.x), unsigned(i / cfg.block.x % cfg.block.y),
                           unsigned(i / cfg.block.x / cfg.block.y)};
      t.state = kRunnable;
      t.open.clear();
      t.groups.clear();
      init_context(t);
      set_bit(i);
    }
    E.alive = E.n;
    E.bar_arrived = E.bar_or = 0;
    E.epoch = 0;
    E.chunks.assign(E.smem_bytes / 16 + 1, Chunk{});
    for (auto& w : E.warps) w.arrived = 0;
    while (E.alive > 0 && !E.failed) {
      const int i = pick();
      if (i < 0) {
        E.failed = true;
        E.error = "cuda_emu: " + deadlock_report();
        break;
      }
      resume(E.threads[size_t(i)]);
    }
    g_thread = nullptr;
#if defined(RAL_EMU_ASAN)
    __asan_unpoison_memory_region(E.smem, kSmemMax + kCanary);
#endif
    if (!E.failed)
      for (size_t i = 0; i < kCanary; ++i)
        if (E.smem[E.smem_bytes + i] != 0xa5) {
          E.failed = true;
          E.error = "cuda_emu: a write past the launch's dynamic shared memory (" + std::to_string(E.smem_bytes) +
                    " bytes)";
          break;
        }
    if (E.failed) {
      char where[96];
      std::snprintf(where, sizeof(where), " [grid %u,%u,%u block %u,%u,%u]", cfg.grid.x, cfg.grid.y, cfg.grid.z,
                    g_block.block_idx.x, g_block.block_idx.y, g_block.block_idx.z);
      E.error += where;
      E.last_error = cudaErrorLaunchFailure;
      return;
    }
  }
}

}  // namespace ral_emu

// ---- runtime API (what csrc/cuda calls; no cudart is linked) ------------------------------------
extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = int(ral_emu::env_long("RAL_EMU_SMS", 4)); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = int(ral_emu::env_long("RAL_EMU_SMEM_OPTIN", 232448)); break;
    case cudaDevAttrComputeCapabilityMajor: *value = 8; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > ral_emu::env_long("RAL_EMU_SMEM_OPTIN", 232448)) return cudaErrorInvalidValue;
  ral_emu::E.max_dyn_smem[func] = value;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t count, cudaStream_t) {
  std::memset(dst, value, count);
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = ral_emu::E.last_error;
  ral_emu::E.last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return ral_emu::E.last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  static thread_local std::string s;
  if (error == cudaErrorLaunchFailure && !ral_emu::E.error.empty()) return ral_emu::E.error.c_str();
  s = "cuda_emu: CUDA error " + std::to_string(int(error));
  if (error == cudaErrorInvalidValue) s += " (invalid argument)";
  if (error == cudaErrorInvalidConfiguration) s += " (invalid configuration)";
  return s.c_str();
}

// For the tests (ctypes): the launches since the last call, one line each; the coroutine switches.
__attribute__((visibility("default"))) const char* ral_emu_take_log(void) {
  static std::string s;
  s = ral_emu::E.log;
  ral_emu::E.log.clear();
  return s.c_str();
}
// Global ranges [lo, hi) that cp.async may read from (the tests register the inputs' extents);
// none registered: no check.
__attribute__((visibility("default"))) void ral_emu_allow(uintptr_t lo, uintptr_t hi) {
  ral_emu::E.allowed.emplace_back(lo, hi);
}
__attribute__((visibility("default"))) void ral_emu_clear_allowed(void) { ral_emu::E.allowed.clear(); }
__attribute__((visibility("default"))) long long ral_emu_switches(void) { return ral_emu::E.switches; }

}  // extern "C"
