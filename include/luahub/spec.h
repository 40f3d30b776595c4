/* `luahub test [-c CONF] SPEC.lua...`: runs policy specs without sockets,
 * the real policy host with fake connections, a recording broker and a
 * fake clock (docs/testing-policies.md). Not part of a running hub: its own
 * command, in its own process. */
#ifndef LUAHUB_SPEC_H
#define LUAHUB_SPEC_H

/* The command: argv[0] is "test", the options and spec files follow.
 * Prints the results (text or TAP) on stdout and problems on stderr.
 * Returns the exit status: 0 every test passed, 1 one failed, 2 a usage
 * error (a missing file, a syntax error, a conf or policy that does not
 * load). */
int hub_spec_main(int argc, char **argv);

#endif
