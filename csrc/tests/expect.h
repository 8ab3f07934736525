// The check of the C++ test executables run by ctest (csrc/tests/test_*.cpp and
// csrc/tests/emu/test_*.cpp): EXPECT(cond, printf-style message) counts a check and, when cond is
// false, prints "FAIL file:line: message" and counts a failure; main returns
// nlk_test::summary(), which prints both counts.
#pragma once

#include <cstdio>

namespace nlk_test {

inline int checks = 0;
inline int failures = 0;

inline int summary() {
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures ? 1 : 0;
}

}  // namespace nlk_test

#define EXPECT(cond, ...)                                       \
  do {                                                          \
    ++nlk_test::checks;                                         \
    if (!(cond)) {                                              \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                        \
      std::fprintf(stderr, "\n");                               \
      ++nlk_test::failures;                                     \
    }                                                           \
  } while (0)
