"""Seeded-bug check of the emulator (not run by pytest): copies csrc, plants one bug, builds the copy
with the emulator (RAL_EMU_CSRC) and runs a slice of tests/test_cuda_emulated.py (the seq_* ones:
tests/test_seqs_cuda_emulated.py), which must fail.

    python tests/cuda_emu/mutate.py [name ...]      # ~20 s per mutation on 2 cores
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_K = "selftest or schedules or head_dims or grid_fp16"
SEQS = "tests/test_seqs_cuda_emulated.py"
# name: (file under csrc, text, replacement, tests to run[, test file])
MUTATIONS = {
    "begin_sync": ("cuda/kernel_utils.cuh", "      cp_async_wait<0>();\n    }\n    __syncthreads();",
                   "      cp_async_wait<0>();\n    }\n", DEFAULT_K),
    "end_sync": ("cuda/kernel_utils.cuh", "  __device__ __forceinline__ void end(Issue&& issue) {\n    __syncthreads();",
                 "  __device__ __forceinline__ void end(Issue&& issue) {\n", DEFAULT_K),
    "wait_depth": ("cuda/kernel_utils.cuh", "      cp_async_wait<1>();", "      cp_async_wait<2>();", DEFAULT_K),
    "bwd_ps_sync": ("cuda/attention_kl_bwd.cuh", "      }\n    __syncthreads();\n    const int64_t kvh",
                    "      }\n    const int64_t kvh", DEFAULT_K),
    "quad_sum": ("cuda/kernel_utils.cuh", "  return x + __shfl_xor_sync(0xffffffffu, x, 2);", "  return x;", DEFAULT_K),
    "c_to_a": ("cuda/kernel_utils.cuh",
               "  a[1] = Dtype<T>::pack(x[2 * kk][2], x[2 * kk][3]);\n  a[2] = Dtype<T>::pack(x[2 * kk + 1][0], x[2 * kk + 1][1]);",
               "  a[2] = Dtype<T>::pack(x[2 * kk][2], x[2 * kk][3]);\n  a[1] = Dtype<T>::pack(x[2 * kk + 1][0], x[2 * kk + 1][1]);",
               DEFAULT_K),
    "rows_fill": ("cuda/kernel_utils.cuh", "const bool valid = r < rows && c < cols;", "const bool valid = c < cols;",
                  DEFAULT_K),
    "zero_fill": ("cuda/kernel_utils.cuh", "const bool valid = r < rows && c < cols;", "const bool valid = r < rows;",
                  "multiple_of_8"),
    # the sequence table: row positions without q_pos, keys past the unit's end, a backward block
    # of another batch element, finalize past the unit's rows
    "seq_q_pos": ("cuda/kernel_utils.cuh", "int32_t(k_begin + s.q_pos - q_begin)", "int32_t(k_begin - q_begin)",
                  "more_keys", SEQS),
    "seq_key_end": ("cuda/kernel_utils.cuh", "bool ok = key < u.k_end();", "bool ok = key < p.k_len;",
                    "packed_fp16 and full", SEQS),
    "seq_bwd_batch": ("cuda/attention_kl_bwd.cuh", "(q0 >= u.q_end() || b != u.batch())", "(q0 >= u.q_end())",
                      "context_parallel", SEQS),
    "seq_finalize": ("cuda/attention_kl_fwd.cu", "if (he >= groups || row >= u.q_end()) return;",
                     "if (he >= groups || row >= p.q_len) return;", "packed_fp16 and mean", SEQS),
}


def main(names):
    caught = True
    for name in names or list(MUTATIONS):
        path, old, new, k, *test_file = MUTATIONS[name]
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(tmp, "csrc"))
            target = os.path.join(tmp, "csrc", path)
            with open(target) as f:
                text = f.read()
            assert text.count(old) == 1, f"{name}: the text to mutate is not in {path} exactly once"
            with open(target, "w") as f:
                f.write(text.replace(old, new))
            t0 = time.time()
            done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                   *(test_file or ["tests/test_cuda_emulated.py"]), "-k", k], cwd=ROOT,
                                  capture_output=True, text=True,
                                  env=dict(os.environ, RAL_EMU_CSRC=os.path.join(tmp, "csrc")))
        why = sorted({line.strip()[:160] for line in done.stdout.splitlines() if "cuda_emu:" in line})[:1]
        print(f"{name:12s} {'caught' if done.returncode else 'MISSED'} ({time.time() - t0:.0f}s) {' '.join(why)}",
              flush=True)
        caught = caught and done.returncode != 0
    return 0 if caught else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
