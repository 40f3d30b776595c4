# Thin wrapper around CMake. `make run` and `make test` install what is missing first.
BUILD      ?= build
BUILD_ASAN ?= build-asan
BUILD_FUZZ ?= build-fuzz
FUZZ_SECONDS ?= 120
FUZZ_TARGETS ?=
CONF       ?= conf/luahub.conf
JOBS       ?= $(shell nproc)

.PHONY: all deps build build-asan build-fuzz fuzz run test test-unit test-asan check clean bench install uninstall

all: build

deps:
	@bash scripts/install-deps.sh

# Quiet builds: compiler warnings and errors only (the suites print the rest).
QUIET = -- --no-print-directory -s

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHUB_WERROR=ON \
		-DCMAKE_RULE_MESSAGES=OFF -DCMAKE_TARGET_MESSAGES=OFF >/dev/null
	@cmake --build $(BUILD) -j $(JOBS) $(QUIET)

build-asan: deps
	@cmake -S . -B $(BUILD_ASAN) -DCMAKE_BUILD_TYPE=Debug -DHUB_ASAN=ON -DHUB_UBSAN=ON \
		-DHUB_WERROR=ON -DCMAKE_RULE_MESSAGES=OFF -DCMAKE_TARGET_MESSAGES=OFF >/dev/null
	@cmake --build $(BUILD_ASAN) -j $(JOBS) $(QUIET)

# The libFuzzer targets (tests/fuzz/README.md): clang, ASan+UBSan, coverage
# instrumentation; the libraries and the targets only.
build-fuzz: deps
	@cmake -S . -B $(BUILD_FUZZ) -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=Debug \
		-DHUB_FUZZ=ON -DHUB_TESTS=OFF -DHUB_WERROR=ON \
		-DCMAKE_RULE_MESSAGES=OFF -DCMAKE_TARGET_MESSAGES=OFF >/dev/null
	@cmake --build $(BUILD_FUZZ) -j $(JOBS) $(QUIET)

# Fuzzes each target FUZZ_SECONDS (default 120), one after the other, and
# prints executions and coverage per target. FUZZ_TARGETS="proto http" picks.
fuzz: build-fuzz
	@bash scripts/fuzz.sh $(BUILD_FUZZ) $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# `make run` builds the hub alone (not the suites) and runs it.
run: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHUB_WERROR=ON \
		-DCMAKE_RULE_MESSAGES=OFF -DCMAKE_TARGET_MESSAGES=OFF >/dev/null
	@cmake --build $(BUILD) -j $(JOBS) --target luahub $(QUIET)
	@./$(BUILD)/luahub -c $(CONF)

check: build
	./$(BUILD)/luahub -c $(CONF) --check

# The whole suite: the C suites twice (the release build, then the ASan+UBSan
# build), each fuzz target once over its seed corpus (the fuzz build: no
# fuzzing, seconds), then the JavaScript suites (luahub.js in node and
# Debian's chromium) against the release binary. Fails if any of them fails.
test: build build-asan build-fuzz
	@rc=0; bash scripts/run-tests.sh $(BUILD) $(BUILD_ASAN) $(BUILD_FUZZ) || rc=1; \
	bash tests/js/run.sh $(BUILD)/luahub || rc=1; exit $$rc

# The long part of the fault suite (tests/fault/README.md), release build:
# the Redis faults three times in one run, 50,000 connection cycles with the
# hub's RSS and descriptors before and after, valgrind after 2,000 cycles.
# Prints one "[fault] ..." line per scenario; fails if any does.
.PHONY: soak
soak: build
	@LUAHUB_BIN=$(CURDIR)/$(BUILD)/luahub LUAHUB_SRC=$(CURDIR) CK_DEFAULT_TIMEOUT=600 \
		./$(BUILD)/tests/test_fault soak

clean:
	rm -rf $(BUILD) $(BUILD_ASAN) $(BUILD_FUZZ)

# Install (docs/operations.md, "Install"): `make build`, then `make install`.
# It installs the binary built in $(BUILD) and builds nothing. With DESTDIR
# (a staging directory) it needs no root. An existing conf is never
# overwritten: the new default goes beside it as luahub.conf.dist.
PREFIX      ?= /usr/local
SYSCONFDIR  ?= /etc
BINDIR      ?= $(PREFIX)/bin
DATADIR     ?= $(PREFIX)/share/luahub
DOCDIR      ?= $(PREFIX)/share/doc/luahub
UNITDIR     ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
CONFDIR     ?= $(SYSCONFDIR)/luahub
LUAHUB      ?= $(BUILD)/luahub

install:
	@test -x "$(LUAHUB)" || { echo "make install: $(LUAHUB) is not built: run" \
		"'make build' first (or name the binary with LUAHUB=...)" >&2; exit 1; }
	install -d "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(DATADIR)/lua" "$(DESTDIR)$(DOCDIR)" \
		"$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(SYSUSERSDIR)" "$(DESTDIR)$(CONFDIR)"
	install -m 755 "$(LUAHUB)" "$(DESTDIR)$(BINDIR)/luahub"
	install -m 644 lua/*.lua "$(DESTDIR)$(DATADIR)/lua/"
	install -m 644 README.md docs/*.md "$(DESTDIR)$(DOCDIR)/"
	sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@CONFDIR@|$(CONFDIR)|g' \
		-e 's|@DOCDIR@|$(DOCDIR)|g' -e 's|@SYSUSERSDIR@|$(SYSUSERSDIR)|g' \
		packaging/luahub.service.in >"$(DESTDIR)$(UNITDIR)/luahub.service"
	chmod 644 "$(DESTDIR)$(UNITDIR)/luahub.service"
	install -m 644 packaging/luahub.sysusers "$(DESTDIR)$(SYSUSERSDIR)/luahub.conf"
	@conf="$(DESTDIR)$(CONFDIR)/luahub.conf"; \
	if [ -e "$$conf" ]; then \
		install -m 640 packaging/luahub.conf "$$conf.dist"; \
		echo "make install: kept $$conf; the new default is $$conf.dist"; \
	else \
		install -m 640 packaging/luahub.conf "$$conf"; \
		if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ] && getent group luahub >/dev/null; then \
			chgrp luahub "$$conf"; \
		else \
			echo "make install: $$conf is mode 0640: once the luahub user exists," \
				"chgrp luahub it (docs/operations.md)"; \
		fi; \
	fi

# Removes what install put in place but the conf directory (your conf).
uninstall:
	rm -f "$(DESTDIR)$(BINDIR)/luahub" "$(DESTDIR)$(UNITDIR)/luahub.service" \
		"$(DESTDIR)$(SYSUSERSDIR)/luahub.conf"
	rm -rf "$(DESTDIR)$(DATADIR)" "$(DESTDIR)$(DOCDIR)"
