// Prints the keep mask of csrc/ccam/dropout.cuh for one (sample, head) block, as rows of 0/1:
// tests/test_dropout.py compiles it with g++ (the emulation build's view of the header) and
// compares it bit for bit with ccam_kernels.dropout.keep_mask.
//   dropout_mask_main SEED OFFSET SAMPLE HEAD HEADS ROW0 KEY0 THRESHOLD ROWS KEYS
#include <cstdio>
#include <cstdlib>

#include "../ccam/dropout.cuh"

int main(int argc, char** argv) {
  if (argc != 11) return 2;
  long long a[10];
  for (int i = 0; i < 10; ++i) a[i] = std::strtoll(argv[i + 1], nullptr, 0);
  const ccam::Dropout d = ccam::make_dropout(uint64_t(a[0]), uint32_t(a[1]), uint32_t(a[7]), a[2], a[3], a[4], a[6]);
  for (long long r = 0; r < a[8]; ++r) {
    for (long long k = 0; k < a[9]; ++k) std::putchar(d.keep(a[5] + r, k) ? '1' : '0');
    std::putchar('\n');
  }
  return 0;
}
