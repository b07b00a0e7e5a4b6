// Host emulation of the CUDA kd_loss kernel (tests only): the row code of kd_loss_rows.cuh run on
// the CPU, with std::threads standing in for the lanes of a row group. It registers the CPU kernel
// of kdengine_cuda_emul::kd_loss_kernel, whose schema is kdengine::kd_loss_kernel's (defined from the one
// string in kdengine/_schemas.py before the library is loaded). tests/test_cuda_compile.py builds it
// with nvcc; kdengine/_native.py leaves files named *_emul.cu out of both native libraries.
//
// Threads: every row runs with the thread count the GPU launch would use (32 for V <= 1024, else
// 64..512), all threads walking the rows together like one block of the kernel.

#include "kd_loss/kd_loss_rows.cuh"

#include <torch/library.h>

#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace kdengine_cuda_kd {


// Lanes of a row group emulated by std::threads: a shuffle is "publish, barrier, read the
// partner's slot, barrier"; __syncthreads is the barrier.
struct HostRowShared {
  explicit HostRowShared(int n) : size(n), slots(static_cast<size_t>(n)) {}
  void barrier() {
    std::unique_lock<std::mutex> lock(mu);
    const int64_t gen = generation;
    if (++arrived == size) {
      arrived = 0;
      ++generation;
      cv.notify_all();
    } else {
      cv.wait(lock, [&] { return generation != gen; });
    }
  }
  int size;
  std::vector<double> slots;  // one value per lane (float and double round-trip exactly)
  alignas(16) double smem[kSmemSlots];
  std::mutex mu;
  std::condition_variable cv;
  int arrived = 0;
  int64_t generation = 0;
};

struct HostLanes {
  HostRowShared* sh;
  int rank;
  template <typename T>
  T exchange(T v, int from) const {
    sh->slots[rank] = static_cast<double>(v);
    sh->barrier();
    const T r = static_cast<T>(sh->slots[from]);
    sh->barrier();
    return r;
  }
  template <typename T>
  T shfl_xor(T v, int off) const { return exchange(v, rank ^ off); }
  template <typename T>
  T shfl_lane0(T v) const { return exchange(v, rank & ~31); }
  void sync() const { sh->barrier(); }
  template <typename T>
  T* smem() const { return reinterpret_cast<T*>(sh->smem); }
};

// Every row with the thread count the GPU launch would use (32 for V <= 1024, else 64..512), all
// threads walking the rows together like one block of the kernel (the Backend of kd_loss_fwd).
struct HostRows {
  struct Guard {  // host lanes: no device to select
    explicit Guard(const c10::Device&) {}
  };
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  static constexpr const char* kWhere = "kdengine_cuda_emul::kd_loss_kernel";
  template <typename scalar_t, typename acc_t>
  static void run_rows(const KDParams<scalar_t, acc_t>& P) {
    constexpr int VEC = static_cast<int>(16 / sizeof(scalar_t));
    const int n = row_threads(P.V, VEC);
    HostRowShared shared(n);
    std::vector<std::thread> threads;
    threads.reserve(n);
    for (int r = 0; r < n; ++r) {
      threads.emplace_back([&, r] {
        const Group<HostLanes> g{r, n, HostLanes{&shared, r}};
        for (int64_t row = 0; row < P.n_rows; ++row) process_row<VEC>(P, row, g);
      });
    }
    for (auto& th : threads) th.join();
  }
};

}  // namespace kdengine_cuda_kd

TORCH_LIBRARY_IMPL(kdengine_cuda_emul, CPU, m) {
  m.impl("kd_loss_kernel", &kdengine_cuda_kd::kd_loss_fwd<kdengine_cuda_kd::HostRows>);
}
