# boma-qvm. `make setup` makes this machine a control node; `make setup-check` proves it.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c

ANSIBLE_PLAYBOOK ?= ansible-playbook
CARGO_BUILD ?= cargo build --release
# The binary the role installs to /usr/local/bin (for a debug build: BIN=target/debug/boma-qvm).
BIN ?= target/release/boma-qvm
# More ansible-playbook arguments, e.g. SETUP_ARGS='-e integration_test_users=[alice]'.
SETUP_ARGS ?=
SETUP_LOG ?= target/setup-check.log

PLAYBOOK = ANSIBLE_NOCOLOR=1 $(ANSIBLE_PLAYBOOK) -i localhost, -c local \
	-e integration_test_binary_src=$(abspath $(BIN)) $(SETUP_ARGS)

.PHONY: setup setup-check

setup:
	$(CARGO_BUILD)
	$(PLAYBOOK) setup.yml

# Second apply must change nothing; then read-only checks of packages, binary, kvm group, cache.
setup-check:
	@mkdir -p $(dir $(SETUP_LOG))
	$(PLAYBOOK) setup.yml | tee $(SETUP_LOG)
	@grep -Eq '^localhost +: ok=[0-9]+ +changed=0 +unreachable=0 +failed=0 ' $(SETUP_LOG) \
		|| { echo "setup-check: FAIL: the re-apply was not a no-op (want changed=0 failed=0); see $(SETUP_LOG)" >&2; exit 1; }
	@echo "setup-check: re-apply changed nothing"
	$(PLAYBOOK) roles/integration_test/tests/verify.yml
	@echo "setup-check: OK"
