package lab

import (
	"fmt"
	"time"

	"github.com/tern-net/tern/agent"
)

// checkListingGrace refuses a node whose agent would trust the emulator's listings sooner
// than they catch up: its listingGrace (agent.DefaultListingGrace when unset) must exceed
// the longest listing lag the lab runs with, or the agent would drop addresses and route
// entries that exist (a broken test set-up, not an agent bug).
func (n *Node) checkListingGrace(c agent.Config) error {
	grace := time.Duration(c.ListingGrace)
	if grace == 0 {
		grace = agent.DefaultListingGrace
	}
	if lag := n.lab.emu.ListingLag().Longest(); grace <= lag {
		return fmt.Errorf("lab: %s's agent has listingGrace %s but the emulator's listings lag up to %s: give it a grace above the lag", n.Name, grace, lag)
	}
	return nil
}
