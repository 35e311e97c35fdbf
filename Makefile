# tern — build, test, benchmark, demo. See README.md.
SHELL := /bin/bash
GO ?= go

# The one pinned BPF compiler. bpf2go reads these; CI regenerates with them and fails on a diff.
CLANG := clang-14
STRIP := llvm-strip-14
export BPF2GO_CC := $(CLANG)
export BPF2GO_STRIP := $(STRIP)
export BPF2GO_CFLAGS := -O2 -g -Wall -Werror -mcpu=v3

BIN := bin

.PHONY: all setup build generate check-generate vmlinux test test-unit test-privileged e2e bench demo demo-down clean

all: build

setup:
	@bash scripts/setup.sh

build:
	$(GO) build -o $(BIN)/ ./cmd/...

# Regenerate the BPF objects and Go bindings (committed). Needs clang-14.
generate: setup
	$(GO) generate ./...

check-generate: generate
	git diff --exit-code -- . || { echo "generated files differ from the committed ones: run 'make generate' and commit" >&2; exit 1; }

# vmlinux.h is committed; this rebuilds it from the running kernel's BTF.
vmlinux:
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > bpf/include/vmlinux.h

test: setup check-generate
	$(GO) vet ./...
	$(GO) test -count=1 ./...

clean:
	rm -rf $(BIN)
