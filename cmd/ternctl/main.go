// Command ternctl shows what tern does on a node: agent status, IPAM, Services, the pinned
// BPF maps and a live stream of drops. The commands live in package ternctl.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/tern-net/tern/ternctl"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := ternctl.Run(ctx)
	stop()
	os.Exit(code)
}
