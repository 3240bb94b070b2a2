# boma-qvm.
#   make setup                      make this machine a control node (build + the integration_test role)
#   make setup-check                prove it: a second apply changes nothing, then read-only checks
#   make test                       the test suite (real QEMU under TCG, real dnsmasq/nftables/Ansible)
#   make test-integration HOST=askari [CERTS=internal] [KEEP=1] [FIX=1] [SNAPSHOT=1] [COLD=1] [REPO=dir]
#                                   [SECRET_VARS='name ...']
#                                   the main job: boma-qvm cycle on the bundled example repo
#   make test-integration-clean     reap every boma-it-* leftover (boma-qvm prune)
#   make bench                      the figures of docs/benchmarks.md (boots Debian VMs for tens of minutes, as root)
#   make test-operator-cycle [HOSTTEST_BIN=path]
#                                   the main job as an operator without sudo: a user it creates runs
#                                   `cycle askari` through a netd it starts, to the red verdict
#                                   (root; about 6 min under TCG; tests/host/operator-cycle.sh)
#   make test-readme-systemd [HOSTTEST_BIN=path]
#                                   the README's first command verbatim, by a sudo user in one
#                                   session, on a fresh Debian 13 booted with systemd as PID 1
#                                   (systemd-nspawn, user-mode NAT to the internet), to the red
#                                   verdict (root; about 7 min; tests/host/readme-systemd.sh)
#   make test-host-systemd [HOSTTEST_BIN=path]
#                                   boma-qvm-netd.service under a real systemd (PID 1 of a fresh
#                                   Debian 13 root in systemd-nspawn): the role starts it, an
#                                   operator's test guest runs through it (root; [SUITE=bookworm];
#                                   about 25 s, plus 1 min once for the root; tests/host/systemd-netd.sh)
#   make test-host-debian13 [HOSTTEST_BIN=path]
#                                   .ci/setup, doctor --boot-test and the test guest on boma-qvm's
#                                   network, on a fresh Debian 13 root filesystem in namespaces
#                                   (root; [HOSTTEST_AS=user] [SUITE=bookworm]; tests/host/debian13.sh)
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c

ANSIBLE_PLAYBOOK ?= ansible-playbook
# The directory of that ansible-playbook: the role records it as BOMA_QVM_ANSIBLE_DIR in
# /etc/boma-qvm/config.env, so boma-qvm runs the same Ansible without it being on PATH.
ANSIBLE_DIR ?= $(patsubst %/,%,$(dir $(shell command -v $(ANSIBLE_PLAYBOOK))))
CARGO_BUILD ?= cargo build --release
# The binary the role installs to /usr/local/bin (for a debug build: BIN=target/debug/boma-qvm).
BIN ?= target/release/boma-qvm
# More ansible-playbook arguments, e.g. SETUP_ARGS='-e integration_test_users=[alice]'.
SETUP_ARGS ?=
SETUP_LOG ?= target/setup-check.log

PLAYBOOK = ANSIBLE_NOCOLOR=1 $(ANSIBLE_PLAYBOOK) -i localhost, -c local \
	-e integration_test_binary_src=$(abspath $(BIN)) -e integration_test_ansible_dir=$(ANSIBLE_DIR) \
	$(SETUP_ARGS)

# The main job's knobs. FIX=1 turns on the docker_host container-forward drop-in (the fix).
HOST ?= askari
REPO ?= tests/fixtures/boma
CERTS ?= internal
KEEP ?=
FIX ?=
SNAPSHOT ?=
# Extra vars marked secret: each value comes from the exported environment variable of the same
# name (never the command line) and is scrubbed from every file the run writes.
SECRET_VARS ?=
BOMA_QVM ?= $(if $(wildcard $(BIN)),$(BIN),boma-qvm)
CYCLE_ARGS = --repo $(REPO) --certs $(CERTS) $(if $(KEEP),--keep) $(if $(SNAPSHOT),--snapshot) $(if $(COLD),--cold) \
	$(if $(FIX),-e docker_host_container_forward=true) $(foreach v,$(SECRET_VARS),--secret-var $(v))

# The boma-qvm that test-host-debian13 installs on the Debian 13 root (PREBUILT_BIN): BIN if
# built, else the debug build.
HOSTTEST_BIN ?= $(if $(wildcard $(BIN)),$(BIN),target/debug/boma-qvm)

.PHONY: setup setup-check test test-integration test-integration-clean test-host-debian13 test-host-systemd test-readme-systemd test-operator-cycle bench

setup:
	$(CARGO_BUILD)
	$(PLAYBOOK) setup.yml

# Second apply must change nothing; then read-only checks of packages, binary, kvm group, cache,
# config (and that the recorded Ansible runs).
setup-check:
	@mkdir -p $(dir $(SETUP_LOG))
	$(PLAYBOOK) setup.yml | tee $(SETUP_LOG)
	@grep -Eq '^localhost +: ok=[0-9]+ +changed=0 +unreachable=0 +failed=0 ' $(SETUP_LOG) \
		|| { echo "setup-check: FAIL: the re-apply was not a no-op (want changed=0 failed=0); see $(SETUP_LOG)" >&2; exit 1; }
	@echo "setup-check: re-apply changed nothing"
	$(PLAYBOOK) roles/integration_test/tests/verify.yml
	@echo "setup-check: OK"

test:
	cargo nextest run --no-fail-fast

# Through .ci/with-groups: a sudo user's session that predates the set-up's groups still works.
test-integration:
	.ci/with-groups $(BOMA_QVM) cycle $(HOST) $(CYCLE_ARGS)

test-integration-clean:
	.ci/with-groups $(BOMA_QVM) prune

# Boots Debian VMs one at a time (tens of minutes under TCG) and rewrites docs/benchmarks.md.
# Built first, then run under BENCH_LOCK so it never shares the CPU with another Debian VM run.
BENCH_LOCK ?= /var/lock/boma-debian-vm.lock
bench:
	cargo bench --bench boma --no-run
	flock $(BENCH_LOCK) cargo bench --bench boma

test-host-debian13:
	nice -n 10 tests/host/debian13.sh $(HOSTTEST_BIN)

test-host-systemd:
	tests/host/systemd-netd.sh $(HOSTTEST_BIN)

test-readme-systemd:
	tests/host/readme-systemd.sh $(HOSTTEST_BIN)

test-operator-cycle:
	tests/host/operator-cycle.sh $(HOSTTEST_BIN)
