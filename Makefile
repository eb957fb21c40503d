# Task runner: every recipe CI runs is here. `make help` lists them.
.PHONY: help deps build guest debian demo demo-stop test lint bench bench-fleet fuzz

CARGO ?= cargo
QUICKSTART := examples/quickstart
SERIAL := $(QUICKSTART)/.plasmavmc/local/vms/hello/serial.log

help:
	@echo "make demo       set up this machine, boot the quickstart VM, show its serial console"
	@echo "make demo-stop  stop the quickstart VM and forget its state (disks included)"
	@echo "make test       set up this machine and run every test (real QEMU)"
	@echo "make debian     build the real Debian 12 guest (target/debian/; tests/guest/debian.sh)"
	@echo "make lint       rustfmt and clippy, as CI runs them"
	@echo "make fuzz       fuzz the spec loader for FUZZ_TIME seconds (needs nightly and cargo-fuzz)"
	@echo "make bench      the benchmarks quoted in the README (plan at 10k VMs, crash -> running, failover, migration, network during moves)"
	@echo "make bench-fleet the fleet-scale figures (plan at 100k VMs, idle daemon with 50 VMs, crash during a long action, reboot of 40 VMs at per_host 8 and 40, power-off with 20 ha VMs, apply of 100 VMs; ~40 min)"

deps:
	@bash .ci/install-deps

build:
	$(CARGO) build -p plasmavmc --bin plasmavmc

guest:
	bash tests/guest/build.sh

# The real Debian 12 guest of tests/real_guest.rs and examples/cloud-init (needs root;
# cached in target/debian/, rebuilt only when the script changes).
debian:
	bash tests/guest/debian.sh

demo: deps build
	bash tests/guest/build.sh --install $(QUICKSTART)/guest
	target/debug/plasmavmc apply --path $(QUICKSTART) --auto-approve
	@echo "waiting for the guest to tick on its serial console ($(SERIAL))..."
	@timeout 120 sh -c 'until grep -q "tick 5" "$(SERIAL)" 2>/dev/null; do sleep 0.2; done' \
		|| { echo "the guest did not tick within 120 s; see $(QUICKSTART)/.plasmavmc/local/vms/hello/qemu.log"; exit 1; }
	@tail -n 4 $(SERIAL)
	target/debug/plasmavmc status --path $(QUICKSTART)
	@echo
	@echo "The VM runs on without this command. Try: edit memory_mb in $(QUICKSTART)/vms/hello.toml, commit,"
	@echo "then 'target/debug/plasmavmc plan --path $(QUICKSTART)'. Stop it all with 'make demo-stop'."

demo-stop:
	@dir=$(CURDIR)/$(QUICKSTART)/.plasmavmc/local/vms/hello; pid=$$(cat $$dir/qemu.pid 2>/dev/null); \
	if [ -n "$$pid" ] && [ "$$(readlink /proc/$$pid/cwd)" = "$$dir" ]; then kill $$pid && echo "stopped QEMU $$pid"; fi
	rm -rf $(QUICKSTART)/.plasmavmc

# No backtraces in test failures: the error (and what the test tells with it) is the
# last thing printed, where a CI log that keeps only its head and tail still shows it.
test: deps guest debian
	RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0 $(CARGO) test --workspace

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

FUZZ_TIME ?= 120

# The real fuzzer: nightly Rust and `cargo install cargo-fuzz`. CI runs the stable smoke
# test (specs/tests/fuzz_smoke.rs) instead, as part of `make test`.
fuzz:
	PLASMAVMC_FUZZ_SEEDS_OUT=$(CURDIR)/fuzz/corpus/specs PLASMAVMC_FUZZ_MUTATIONS=0 \
		$(CARGO) test -p plasmavmc-specs --test fuzz_smoke -- seeded_mutations
	cd fuzz && $(CARGO) +nightly fuzz run specs -- -dict=specs.dict -max_total_time=$(FUZZ_TIME)

bench:
	$(CARGO) bench -p plasmavmc-e2e --bench heal
	$(CARGO) bench -p plasmavmc-e2e --bench failover
	$(CARGO) bench -p plasmavmc-e2e --bench migrate
	$(CARGO) bench -p plasmavmc-e2e --bench netmove
	$(CARGO) bench -p plasmavmc --bench plan10k

# Not part of `bench`: the fleet-scale figures boot tens of TCG guests and take about
# 40 minutes on two cores (BENCHMARKS.md, "Fleet scale").
bench-fleet:
	$(CARGO) bench -p plasmavmc --bench plan100k
	$(CARGO) bench -p plasmavmc-e2e --bench idle
	$(CARGO) bench -p plasmavmc-e2e --bench longaction
	$(CARGO) bench -p plasmavmc-e2e --bench reboot40
	REBOOT_PER_HOST=40 $(CARGO) bench -p plasmavmc-e2e --bench reboot40
	$(CARGO) bench -p plasmavmc-e2e --bench poweroff20
	$(CARGO) bench -p plasmavmc-e2e --bench apply100
