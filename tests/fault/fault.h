/* The fault suite's test cases that are not Redis faults (fault_host.c):
 * descriptors exhausted, connection cycles, valgrind at SIGTERM. */
#ifndef FAULT_H
#define FAULT_H

#include <check.h>

/* The test case of the fast suite (soak = 0) or of the soak (soak = 1). */
TCase *fault_host_tcase(int soak);

#endif
