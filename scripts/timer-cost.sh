#!/usr/bin/env bash
# What a short sleep really costs on this host: for several requested lengths, how long
# nanosleep lasts and how much CPU each call burns (with a 1 us timer slack, as udm's
# vhost workers use). Under nested virtualisation both can be many times the request,
# which is why udm's idle policy measures its naps (server/src/vhost_blk/idle.rs).
#   bash scripts/timer-cost.sh [CPU]     # default CPU 1, where bench-vhost.sh puts the server
set -euo pipefail
CPU=${1:-1}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
cat > "$W/nap.c" <<'C'
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <time.h>
static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}
static double cpu_us(void) {
  struct rusage u;
  getrusage(RUSAGE_SELF, &u);
  return (u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1e6 + u.ru_utime.tv_usec + u.ru_stime.tv_usec;
}
int main(void) {
  prctl(PR_SET_TIMERSLACK, 1000);
  int asks[] = {2, 5, 10, 20, 50};
  for (int k = 0; k < 5; k++) {
    struct timespec r = {0, asks[k] * 1000};
    int n = 20000;
    double t0 = now_us(), c0 = cpu_us();
    for (int i = 0; i < n; i++) nanosleep(&r, 0);
    double t1 = now_us(), c1 = cpu_us();
    printf("nanosleep(%2d us): lasts %5.1f us, costs %5.2f us of CPU\n", asks[k], (t1 - t0) / n, (c1 - c0) / n);
  }
  return 0;
}
C
gcc -O2 -o "$W/nap" "$W/nap.c"
taskset -c "$CPU" "$W/nap"
