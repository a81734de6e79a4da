// Runs part of a test in a forked child, for the fault tests that change what
// a process can never take back (its credentials, its signal dispositions, the
// environment read once per process) or that must survive the child dying.
// The child runs GoogleTest assertions as usual; its failures print at once
// (on the inherited stdout) and its exit status carries the verdict back:
// pass, fail, or skipped (with the reason printed). A child that outlives its
// time limit is killed and the test fails. Header-only, test code only.
#pragma once

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <thread>

namespace ringpark::test {

inline constexpr int kChildPass = 0;
inline constexpr int kChildFail = 1;
inline constexpr int kChildSkip = 77;

struct ChildOutcome {
  bool timed_out = false;
  int status = 0;  // from waitpid

  bool passed() const {
    return !timed_out && WIFEXITED(status) && WEXITSTATUS(status) == kChildPass;
  }
  bool skipped() const {
    return !timed_out && WIFEXITED(status) && WEXITSTATUS(status) == kChildSkip;
  }
  std::string describe() const {
    if (timed_out) return "the child was killed after its time limit";
    if (WIFEXITED(status))
      return "the child exited with status " + std::to_string(WEXITSTATUS(status));
    if (WIFSIGNALED(status)) return std::string("the child died of ") + strsignal(WTERMSIG(status));
    return "the child ended with wait status " + std::to_string(status);
  }
};

// Forks; the child runs `body` (gtest assertions allowed; an ASSERT_ returns
// from it) and exits with kChildFail if anything failed, kChildSkip if it
// skipped, else kChildPass, without running destructors or atexit handlers of
// the parent's state. Waits at most `limit`, then kills the child.
inline ChildOutcome run_in_child(const std::function<void()>& body,
                                 std::chrono::milliseconds limit = std::chrono::seconds(30)) {
  ChildOutcome outcome;
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) {
    ADD_FAILURE() << "fork: " << std::strerror(errno);
    outcome.status = kChildFail << 8;
    return outcome;
  }
  if (pid == 0) {
    body();
    int code = kChildPass;
    if (::testing::Test::HasFailure()) {
      code = kChildFail;
    } else if (::testing::Test::IsSkipped()) {
      code = kChildSkip;
    }
    std::fflush(nullptr);
    ::_exit(code);
  }
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    const pid_t r = ::waitpid(pid, &outcome.status, WNOHANG);
    if (r == pid) break;
    if (r < 0 && errno != EINTR) {
      ADD_FAILURE() << "waitpid: " << std::strerror(errno);
      break;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &outcome.status, 0);
      outcome.timed_out = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return outcome;
}

// The verdict of a child in the parent: skip with the child's reason (already
// printed by the child), or fail with how it ended.
#define RP_EXPECT_CHILD_PASSED(outcome)                                         \
  do {                                                                          \
    const ::ringpark::test::ChildOutcome& rp_outcome_ = (outcome);              \
    if (rp_outcome_.skipped()) GTEST_SKIP() << "the child skipped (see above)"; \
    EXPECT_TRUE(rp_outcome_.passed()) << rp_outcome_.describe();                \
  } while (0)

}  // namespace ringpark::test
