package agent

import (
	"fmt"
	"time"
)

// The listing grace. Alibaba Cloud documents no read-after-write guarantee for
// DescribeNetworkInterfaces or DescribeRouteEntryList: an address just assigned, an ENI just
// created or a route entry just added may be missing from a listing for a while, and one just
// removed may still be listed. The pools therefore act on a difference between their records
// and a listing only once a listing taken listingGrace later still shows it (ENIIP and
// exclusive ENIs: adopt, delete or drop), and the route mode waits that long for an entry the
// cloud accepted to be listed. It must exceed the longest lag the cloud's listings show; a
// shorter one makes the agent drop addresses pods hold or adopt ones already unassigned.

// Bounds of listingGrace.
const (
	// DefaultListingGrace is the pools' default (ipam.Options.ListingGrace).
	DefaultListingGrace = 10 * time.Second
	// MaxListingGrace bounds it: no listing lags by an hour, and a longer grace keeps
	// addresses the cloud took back, and leaked ENIs, in the pool for that long.
	MaxListingGrace = time.Hour
	// defaultCloudPoll is ipam/aliyun's default PollInterval (cloud.pollInterval).
	defaultCloudPoll = 500 * time.Millisecond
)

// validateListingGrace refuses a grace that cannot work: negative, not longer than one poll
// of the cloud (no listing is taken between the change and the decision), or past
// MaxListingGrace.
func (c Config) validateListingGrace() []error {
	g := time.Duration(c.ListingGrace)
	if g == 0 {
		return nil
	}
	poll := time.Duration(c.Cloud.PollInterval)
	if poll <= 0 {
		poll = defaultCloudPoll
	}
	switch {
	case g < 0:
		return []error{fmt.Errorf("listingGrace %s is negative: use a duration longer than the cloud's listing lag, such as \"10s\" (the default)", g)}
	case g <= poll:
		return []error{fmt.Errorf("listingGrace %s does not exceed cloud.pollInterval %s: the agent would judge a listing no later poll could correct; "+
			"set it above the longest lag of the cloud's listings (seconds on Alibaba Cloud; default %s)", g, poll, DefaultListingGrace)}
	case g > MaxListingGrace:
		return []error{fmt.Errorf("listingGrace %s is longer than %s: no cloud listing lags that long, and addresses the cloud took back would stay in the pool meanwhile; "+
			"set it above the longest lag of the cloud's listings (default %s)", g, MaxListingGrace, DefaultListingGrace)}
	}
	return nil
}
