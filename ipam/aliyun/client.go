package aliyun

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/aliyun/alibaba-cloud-sdk-go/sdk"
	"github.com/aliyun/alibaba-cloud-sdk-go/sdk/auth"
	"github.com/aliyun/alibaba-cloud-sdk-go/sdk/auth/credentials"
	"github.com/aliyun/alibaba-cloud-sdk-go/sdk/requests"
	"github.com/aliyun/alibaba-cloud-sdk-go/services/ecs"
	"github.com/aliyun/alibaba-cloud-sdk-go/services/vpc"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/time/rate"

	"github.com/tern-net/tern/ipam/credential"
)

// Backoff configures retries of retryable failures: the n-th retry waits
// min(Max, Initial·Multiplier^(n-1)) scaled by a random factor in [1-Jitter, 1].
type Backoff struct {
	Initial     time.Duration
	Max         time.Duration
	Multiplier  float64
	Jitter      float64 // 0..1
	MaxAttempts int     // total attempts including the first
}

// RateLimit is a token bucket for one API action.
type RateLimit struct {
	PerSecond float64
	Burst     int
}

// Options configure a Client.
type Options struct {
	RegionID   string
	Credential credential.Credential
	// Credentials, when set, replaces Credential: it is asked before every call, so a
	// rotated token file is used without a restart (credential.FileSource).
	Credentials credential.Source
	// Endpoint overrides both services' endpoints with host[:port] (for example the emulator's
	// 127.0.0.1:port). Empty uses the SDK's regional endpoints.
	Endpoint string
	// Scheme is "HTTPS" or "HTTP"; empty means HTTPS, or HTTP for a loopback Endpoint.
	Scheme string
	// CallTimeout bounds one HTTP round trip (default 10s).
	CallTimeout time.Duration
	// PollInterval is the pause between status polls while waiting for an ENI transition
	// (default 500ms); WaitTimeout bounds the whole wait (default 2m).
	PollInterval time.Duration
	WaitTimeout  time.Duration
	Backoff      Backoff
	// RateLimits per action override DefaultRateLimits.
	RateLimits map[string]RateLimit
	Logger     *zap.Logger
}

// DefaultBackoff retries for about 10 s in total.
var defaultBackoff = Backoff{Initial: 200 * time.Millisecond, Max: 3 * time.Second, Multiplier: 2, Jitter: 0.5, MaxAttempts: 6}

// DefaultRateLimits are per-action budgets well below the per-account API limits, so one busy
// node cannot throttle the others.
func DefaultRateLimits() map[string]RateLimit {
	return map[string]RateLimit{
		actDescribeInstanceTypes: {PerSecond: 2, Burst: 4},
		actDescribeInstances:     {PerSecond: 5, Burst: 10},
		actDescribeENIs:          {PerSecond: 20, Burst: 40},
		actCreateENI:             {PerSecond: 5, Burst: 10},
		actAttachENI:             {PerSecond: 5, Burst: 10},
		actDetachENI:             {PerSecond: 5, Burst: 10},
		actDeleteENI:             {PerSecond: 5, Burst: 10},
		actAssignIPs:             {PerSecond: 10, Burst: 20},
		actUnassignIPs:           {PerSecond: 10, Burst: 20},
		actDescribeVSwitches:     {PerSecond: 5, Burst: 10},
		actCreateRoute:           {PerSecond: 2, Burst: 4},
		actDeleteRoute:           {PerSecond: 2, Burst: 4},
		actDescribeRouteEntries:  {PerSecond: 10, Burst: 20},
		actDescribeRouteTables:   {PerSecond: 2, Burst: 4},
	}
}

// API action names (labels of the metrics).
const (
	actDescribeInstanceTypes = "DescribeInstanceTypes"
	actDescribeInstances     = "DescribeInstances"
	actDescribeENIs          = "DescribeNetworkInterfaces"
	actCreateENI             = "CreateNetworkInterface"
	actAttachENI             = "AttachNetworkInterface"
	actDetachENI             = "DetachNetworkInterface"
	actDeleteENI             = "DeleteNetworkInterface"
	actAssignIPs             = "AssignPrivateIpAddresses"
	actUnassignIPs           = "UnassignPrivateIpAddresses"
	actDescribeVSwitches     = "DescribeVSwitches"
	actCreateRoute           = "CreateRouteEntry"
	actDeleteRoute           = "DeleteRouteEntry"
	actDescribeRouteEntries  = "DescribeRouteEntryList"
	actDescribeRouteTables   = "DescribeRouteTableList"
)

// Client implements Cloud over the Alibaba Cloud Go SDK.
type Client struct {
	ecs      *ecs.Client
	vpc      *vpc.Client
	opts     Options
	limiters map[string]*rate.Limiter
	log      *zap.Logger
	sdkMu    sync.Mutex // serialises calls into the SDK clients (see call)

	calls    *prometheus.CounterVec
	duration *prometheus.HistogramVec
}

var _ Cloud = (*Client)(nil)

// New builds a client. It makes no API call.
func New(o Options) (*Client, error) {
	if o.RegionID == "" {
		return nil, fmt.Errorf("aliyun client: RegionID is empty; set region_id in eni_conf")
	}
	if o.Credentials == nil {
		if o.Credential.AccessKeyID == "" || o.Credential.AccessKeySecret == "" {
			return nil, fmt.Errorf("aliyun client: %w", credential.ErrNoCredential)
		}
		o.Credentials = credential.Static(o.Credential)
	}
	if o.CallTimeout <= 0 {
		o.CallTimeout = 10 * time.Second
	}
	if o.PollInterval <= 0 {
		o.PollInterval = 500 * time.Millisecond
	}
	if o.WaitTimeout <= 0 {
		o.WaitTimeout = 2 * time.Minute
	}
	if o.Backoff.MaxAttempts <= 0 {
		o.Backoff = defaultBackoff
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	loopback := false
	if o.Endpoint != "" {
		host := o.Endpoint
		if h, _, err := net.SplitHostPort(o.Endpoint); err == nil {
			host = h
		}
		if ip, err := netip.ParseAddr(host); err == nil && ip.IsLoopback() || host == "localhost" {
			loopback = true
		}
	}
	if o.Scheme == "" {
		o.Scheme = "HTTPS"
		if loopback {
			o.Scheme = "HTTP"
		}
	}

	cfg := sdk.NewConfig().WithScheme(strings.ToUpper(o.Scheme)).WithTimeout(o.CallTimeout)
	cfg.AutoRetry = false // we retry ourselves, with tokens and backoff
	// The SDK asks a CredentialsProvider for every request it signs.
	var cred auth.Credential = sdkCredentials{src: o.Credentials, log: o.Logger}
	ec, err := ecs.NewClientWithOptions(o.RegionID, cfg, cred)
	if err != nil {
		return nil, fmt.Errorf("create ECS client for region %s: %w", o.RegionID, err)
	}
	vcfg := sdk.NewConfig().WithScheme(strings.ToUpper(o.Scheme)).WithTimeout(o.CallTimeout)
	vcfg.AutoRetry = false
	vc, err := vpc.NewClientWithOptions(o.RegionID, vcfg, cred)
	if err != nil {
		return nil, fmt.Errorf("create VPC client for region %s: %w", o.RegionID, err)
	}
	if o.Endpoint != "" {
		ec.Domain = o.Endpoint
		vc.Domain = o.Endpoint
	}
	if loopback {
		// The SDK applies HTTP(S)_PROXY even to loopback; a local endpoint must never be proxied.
		for _, c := range []*sdk.Client{&ec.Client, &vc.Client} {
			c.SetNoProxy(o.Endpoint)
			c.SetHttpProxy("")
			c.SetHttpsProxy("")
		}
	}

	limits := DefaultRateLimits()
	for k, v := range o.RateLimits {
		limits[k] = v
	}
	lim := make(map[string]*rate.Limiter, len(limits))
	for k, v := range limits {
		lim[k] = rate.NewLimiter(rate.Limit(v.PerSecond), max(v.Burst, 1))
	}
	return &Client{
		ecs: ec, vpc: vc, opts: o, limiters: lim, log: o.Logger,
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tern_cloud_api_calls_total",
			Help: "ECS/VPC OpenAPI calls by action and result (ok, or the error code).",
		}, []string{"action", "result"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "tern_cloud_api_call_duration_seconds",
			Help:    "Duration of one ECS/VPC OpenAPI round trip by action.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 12),
		}, []string{"action"}),
	}, nil
}

// sdkCredentials adapts a credential.Source to the SDK's per-request provider.
type sdkCredentials struct {
	src credential.Source
	log *zap.Logger
}

var _ credentials.CredentialsProvider = sdkCredentials{}

func (p sdkCredentials) GetCredentials() (*credentials.Credentials, error) {
	c, err := p.src.Get()
	if c.AccessKeyID == "" {
		if err == nil {
			err = credential.ErrNoCredential
		}
		return nil, fmt.Errorf("cloud credentials: %w", err)
	}
	if err != nil {
		// The source still has a usable credential; the operator should see why the new one
		// was not taken. The error names the file, never the key material.
		p.log.Warn("credential source", zap.Error(err))
	}
	return &credentials.Credentials{AccessKeyId: c.AccessKeyID, AccessKeySecret: c.AccessKeySecret,
		SecurityToken: c.SecurityToken, ProviderName: p.GetProviderName()}, nil
}

func (sdkCredentials) GetProviderName() string { return "tern" }

// Collectors returns the client's metrics for the caller to register.
func (c *Client) Collectors() []prometheus.Collector {
	return []prometheus.Collector{c.calls, c.duration}
}

// Close releases the SDK clients' resources.
func (c *Client) Close() {
	c.ecs.Shutdown()
	c.vpc.Shutdown()
}

// call runs one logical API call: rate limit, attempt, classify, back off, retry. build must
// create a fresh SDK request each time (the SDK signs per send) but capture any ClientToken
// from outside so every attempt carries the same one.
func (c *Client) call(ctx context.Context, action string, do func() error) error {
	lim := c.limiters[action]
	if lim == nil {
		lim = rate.NewLimiter(rate.Inf, 1)
	}
	b := c.opts.Backoff
	delay := b.Initial
	for attempt := 1; ; attempt++ {
		if err := lim.Wait(ctx); err != nil {
			// rate.Limiter.Wait refuses at once, with ctx still live, a wait that would end
			// past ctx's deadline (burst is at least 1, so that is its only refusal). Callers
			// tell "cut short, the cloud may still act" from "failed" by ctx.Err(), so wait
			// the deadline out: the call ends as any call the deadline cut does. (Returning
			// early let an ADD take an attach still under way for a failure, roll back its
			// record and free a member slot the cloud still held.)
			if _, ok := ctx.Deadline(); ok {
				<-ctx.Done()
			}
			return fmt.Errorf("%s: waiting for the rate limiter: %w", action, ctxErr(ctx, err))
		}
		start := time.Now()
		err := runCtx(ctx, func() error {
			// The SDK client is not safe for concurrent calls: every call rewrites its shared
			// http.Client's timeout and dialer (sdk.Client.setTimeout). One call at a time per
			// client; the lock is taken inside the goroutine, so a caller whose context ends
			// still returns at once.
			c.sdkMu.Lock()
			defer c.sdkMu.Unlock()
			return do()
		})
		c.duration.WithLabelValues(action).Observe(time.Since(start).Seconds())
		if err == nil {
			c.calls.WithLabelValues(action, "ok").Inc()
			return nil
		}
		if ctx.Err() != nil {
			c.calls.WithLabelValues(action, "canceled").Inc()
			return fmt.Errorf("%s: %w", action, ctx.Err())
		}
		ae, retry := classify(action, err)
		ae.Attempts = attempt
		result := ae.Code
		if result == "" {
			result = "error"
		}
		c.calls.WithLabelValues(action, result).Inc()
		if !retry || attempt >= b.MaxAttempts {
			return ae
		}
		wait := time.Duration(float64(delay) * (1 - b.Jitter*rand.Float64()))
		c.log.Debug("retrying cloud call", zap.String("action", action), zap.String("code", ae.Code),
			zap.String("requestId", ae.RequestID), zap.Int("attempt", attempt), zap.Duration("wait", wait))
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%s: %w (last error: %v)", action, ctx.Err(), ae)
		case <-t.C:
		}
		delay = min(time.Duration(float64(delay)*b.Multiplier), b.Max)
	}
}

// runCtx runs do but returns as soon as ctx ends: the SDK takes no context. The abandoned call
// finishes in the background; its outcome is reconciled later like any interrupted operation.
func runCtx(ctx context.Context, do func() error) error {
	if ctx.Done() == nil {
		return do()
	}
	ch := make(chan error, 1)
	go func() { ch <- do() }()
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// InstanceTypeLimits implements Cloud.
func (c *Client) InstanceTypeLimits(ctx context.Context, instanceType string) (Limits, error) {
	var resp *ecs.DescribeInstanceTypesResponse
	err := c.call(ctx, actDescribeInstanceTypes, func() error {
		req := ecs.CreateDescribeInstanceTypesRequest()
		req.InstanceTypes = &[]string{instanceType}
		r, err := c.ecs.DescribeInstanceTypes(req)
		resp = r
		return err
	})
	if err != nil {
		return Limits{}, err
	}
	for _, t := range resp.InstanceTypes.InstanceType {
		if t.InstanceTypeId == instanceType {
			return Limits{
				InstanceType: t.InstanceTypeId,
				ENIs:         t.EniQuantity,
				IPsPerENI:    t.EniPrivateIpAddressQuantity,
				TotalENIs:    t.EniTotalQuantity,
				IPv6PerENI:   t.EniIpv6AddressQuantity,
				TrunkSupport: t.EniTrunkSupported,
			}, nil
		}
	}
	return Limits{}, &APIError{Action: actDescribeInstanceTypes, Code: "InstanceType.NotFound", RequestID: resp.RequestId,
		Message: fmt.Sprintf("instance type %q not in the reply", instanceType), cause: ErrNotFound}
}

// Instance implements Cloud.
func (c *Client) Instance(ctx context.Context, instanceID string) (Instance, error) {
	var resp *ecs.DescribeInstancesResponse
	err := c.call(ctx, actDescribeInstances, func() error {
		req := ecs.CreateDescribeInstancesRequest()
		req.InstanceIds = fmt.Sprintf("[%q]", instanceID)
		r, err := c.ecs.DescribeInstances(req)
		resp = r
		return err
	})
	if err != nil {
		return Instance{}, err
	}
	for _, in := range resp.Instances.Instance {
		if in.InstanceId != instanceID {
			continue
		}
		out := Instance{
			ID: in.InstanceId, Type: in.InstanceType, ZoneID: in.ZoneId,
			VPCID: in.VpcAttributes.VpcId, VSwitchID: in.VpcAttributes.VSwitchId,
			SecurityGroups: in.SecurityGroupIds.SecurityGroupId,
		}
		if ips := in.VpcAttributes.PrivateIpAddress.IpAddress; len(ips) > 0 {
			out.PrimaryIP, _ = netip.ParseAddr(ips[0])
		}
		return out, nil
	}
	return Instance{}, &APIError{Action: actDescribeInstances, Code: "InvalidInstanceId.NotFound", RequestID: resp.RequestId,
		Message: fmt.Sprintf("instance %s not found in region %s", instanceID, c.opts.RegionID), cause: ErrNotFound}
}

// ListENIs implements Cloud.
func (c *Client) ListENIs(ctx context.Context, f ENIFilter) ([]ENI, error) {
	const pageSize = 100
	var out []ENI
	for page := 1; ; page++ {
		var resp *ecs.DescribeNetworkInterfacesResponse
		err := c.call(ctx, actDescribeENIs, func() error {
			req := ecs.CreateDescribeNetworkInterfacesRequest()
			req.PageNumber = requestsInt(page)
			req.PageSize = requestsInt(pageSize)
			if len(f.IDs) > 0 {
				ids := append([]string(nil), f.IDs...)
				req.NetworkInterfaceId = &ids
			}
			req.InstanceId = f.InstanceID
			req.VSwitchId = f.VSwitchID
			req.Status = f.Status
			if len(f.Tags) > 0 {
				tags := make([]ecs.DescribeNetworkInterfacesTag, 0, len(f.Tags))
				for k, v := range f.Tags {
					tags = append(tags, ecs.DescribeNetworkInterfacesTag{Key: k, Value: v})
				}
				req.Tag = &tags
			}
			r, err := c.ecs.DescribeNetworkInterfaces(req)
			resp = r
			return err
		})
		if err != nil {
			return nil, err
		}
		sets := resp.NetworkInterfaceSets.NetworkInterfaceSet
		for _, s := range sets {
			e := eniFromSet(s)
			if matches(e, f) { // filter again: never trust a filter we depend on for ownership
				out = append(out, e)
			}
		}
		if len(sets) < pageSize || (resp.TotalCount > 0 && page*pageSize >= resp.TotalCount) {
			return out, nil
		}
	}
}

func matches(e ENI, f ENIFilter) bool {
	if f.InstanceID != "" && e.InstanceID != f.InstanceID {
		return false
	}
	if f.VSwitchID != "" && e.VSwitchID != f.VSwitchID {
		return false
	}
	if f.Status != "" && e.Status != f.Status {
		return false
	}
	for k, v := range f.Tags {
		if e.Tags[k] != v {
			return false
		}
	}
	if len(f.IDs) > 0 {
		found := false
		for _, id := range f.IDs {
			found = found || id == e.ID
		}
		return found
	}
	return true
}

// splitIPs separates an ENI's primary address from its secondary ones. The set marks the
// primary, but the ENI's own PrivateIpAddress field names it too; either is enough.
func splitIPs(primary string, set []ecs.PrivateIpSet) (netip.Addr, []netip.Addr) {
	prim, _ := netip.ParseAddr(primary)
	var secondary []netip.Addr
	for _, p := range set {
		ip, err := netip.ParseAddr(p.PrivateIpAddress)
		if err != nil {
			continue
		}
		if p.Primary || ip == prim {
			prim = ip
			continue
		}
		secondary = append(secondary, ip)
	}
	return prim, secondary
}

func eniFromSet(s ecs.NetworkInterfaceSet) ENI {
	e := ENI{
		ID: s.NetworkInterfaceId, MAC: s.MacAddress, VSwitchID: s.VSwitchId, ZoneID: s.ZoneId,
		Status: s.Status, Type: s.Type, InstanceID: s.InstanceId, Tags: map[string]string{},
	}
	if e.InstanceID == "" {
		e.InstanceID = s.Attachment.InstanceId
	}
	if s.Attachment.TrunkNetworkInterfaceId != "" {
		e.TrunkID, e.VLAN = s.Attachment.TrunkNetworkInterfaceId, s.Attachment.DeviceIndex
	}
	e.PrimaryIP, e.Secondary = splitIPs(s.PrivateIpAddress, s.PrivateIpSets.PrivateIpSet)
	for _, t := range s.Tags.Tag {
		k, v := t.Key, t.Value
		if k == "" {
			k, v = t.TagKey, t.TagValue
		}
		e.Tags[k] = v
	}
	return e
}

// CreateENI implements Cloud.
func (c *Client) CreateENI(ctx context.Context, r CreateENIRequest) (ENI, error) {
	if r.Token == "" {
		return ENI{}, fmt.Errorf("CreateENI on vSwitch %s: empty token; generate one per logical create and record it first", r.VSwitchID)
	}
	if r.SecondaryIPs < 0 || r.SecondaryIPs > MaxIPsPerCall {
		return ENI{}, fmt.Errorf("CreateENI: %d secondary IPs requested; allowed 0..%d", r.SecondaryIPs, MaxIPsPerCall)
	}
	var resp *ecs.CreateNetworkInterfaceResponse
	err := c.call(ctx, actCreateENI, func() error {
		req := ecs.CreateCreateNetworkInterfaceRequest()
		req.VSwitchId = r.VSwitchID
		sgs := append([]string(nil), r.SecurityGroups...)
		req.SecurityGroupIds = &sgs
		if r.SecondaryIPs > 0 {
			req.SecondaryPrivateIpAddressCount = requestsInt(r.SecondaryIPs)
		}
		tags := make([]ecs.CreateNetworkInterfaceTag, 0, len(r.Tags))
		for k, v := range r.Tags {
			tags = append(tags, ecs.CreateNetworkInterfaceTag{Key: k, Value: v})
		}
		req.Tag = &tags
		req.NetworkInterfaceName = r.Name
		req.Description = r.Description
		req.ClientToken = r.Token
		if r.Trunk {
			req.InstanceType = TypeTrunk
		}
		out, err := c.ecs.CreateNetworkInterface(req)
		resp = out
		return err
	})
	if err != nil {
		return ENI{}, err
	}
	e := ENI{ID: resp.NetworkInterfaceId, MAC: resp.MacAddress, VSwitchID: resp.VSwitchId, ZoneID: resp.ZoneId,
		Status: resp.Status, Type: resp.Type, Tags: map[string]string{}}
	e.PrimaryIP, e.Secondary = splitIPs(resp.PrivateIpAddress, resp.PrivateIpSets.PrivateIpSet)
	for k, v := range r.Tags {
		e.Tags[k] = v
	}
	if e.Status == "" {
		e.Status = StatusAvailable
	}
	return e, nil
}

// AttachENI implements Cloud.
func (c *Client) AttachENI(ctx context.Context, eniID, instanceID string) (ENI, error) {
	err := c.call(ctx, actAttachENI, func() error {
		req := ecs.CreateAttachNetworkInterfaceRequest()
		req.NetworkInterfaceId = eniID
		req.InstanceId = instanceID
		_, err := c.ecs.AttachNetworkInterface(req)
		return err
	})
	if err != nil && !isInvalidState(err) {
		return ENI{}, err
	}
	// A wrong-state reply may mean an earlier attempt already attached it: the wait decides.
	return c.waitFor(ctx, eniID, "attached to "+instanceID, func(e *ENI) (bool, error) {
		switch {
		case e == nil:
			return false, fmt.Errorf("ENI %s vanished while attaching to %s: %w", eniID, instanceID, ErrNotFound)
		case e.Status == StatusInUse && e.InstanceID == instanceID:
			return true, nil
		case e.Status == StatusAttaching:
			return false, nil
		case e.Status == StatusAvailable:
			// The attach may not be visible yet: the listing lags behind the call, also when
			// the call found the ENI already attaching (a wrong-state reply).
			return false, nil
		default:
			if err != nil {
				return false, err
			}
			return false, fmt.Errorf("ENI %s is %s on instance %q, not attaching to %s: %w", eniID, e.Status, e.InstanceID, instanceID, ErrInvalidState)
		}
	})
}

// DetachENI implements Cloud.
func (c *Client) DetachENI(ctx context.Context, eniID, instanceID string) error {
	err := c.call(ctx, actDetachENI, func() error {
		req := ecs.CreateDetachNetworkInterfaceRequest()
		req.NetworkInterfaceId = eniID
		req.InstanceId = instanceID
		_, err := c.ecs.DetachNetworkInterface(req)
		return err
	})
	if isNotFound(err) {
		return nil
	}
	if err != nil && !isInvalidState(err) {
		return err
	}
	_, err = c.waitFor(ctx, eniID, "detached", func(e *ENI) (bool, error) {
		switch {
		case e == nil:
			return true, nil
		case e.Status == StatusAvailable:
			return true, nil
		case e.Status == StatusDetaching:
			return false, nil
		case e.Status == StatusInUse && e.InstanceID == instanceID:
			return false, nil // the detach may not be visible yet (the listing lags)
		default:
			if err != nil {
				return false, err
			}
			return false, fmt.Errorf("ENI %s is %s while detaching: %w", eniID, e.Status, ErrInvalidState)
		}
	})
	return err
}

// DeleteENI implements Cloud.
func (c *Client) DeleteENI(ctx context.Context, eniID string) error {
	err := c.call(ctx, actDeleteENI, func() error {
		req := ecs.CreateDeleteNetworkInterfaceRequest()
		req.NetworkInterfaceId = eniID
		_, err := c.ecs.DeleteNetworkInterface(req)
		return err
	})
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	_, err = c.waitFor(ctx, eniID, "deleted", func(e *ENI) (bool, error) {
		return e == nil, nil
	})
	return err
}

// AssignPrivateIPs implements Cloud.
func (c *Client) AssignPrivateIPs(ctx context.Context, eniID string, count int, token string) ([]netip.Addr, error) {
	if count < 1 || count > MaxIPsPerCall {
		return nil, fmt.Errorf("AssignPrivateIPs to %s: count %d; allowed 1..%d", eniID, count, MaxIPsPerCall)
	}
	if token == "" {
		return nil, fmt.Errorf("AssignPrivateIPs to %s: empty token; generate one per logical assign and record it first", eniID)
	}
	var resp *ecs.AssignPrivateIpAddressesResponse
	err := c.call(ctx, actAssignIPs, func() error {
		req := ecs.CreateAssignPrivateIpAddressesRequest()
		req.NetworkInterfaceId = eniID
		req.SecondaryPrivateIpAddressCount = requestsInt(count)
		req.ClientToken = token
		r, err := c.ecs.AssignPrivateIpAddresses(req)
		resp = r
		return err
	})
	if err != nil {
		return nil, err
	}
	return assignedAddrs(eniID, resp)
}

// assignedAddrs parses the addresses an AssignPrivateIpAddresses reply names.
func assignedAddrs(eniID string, resp *ecs.AssignPrivateIpAddressesResponse) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, s := range resp.AssignedPrivateIpAddressesSet.PrivateIpSet.PrivateIpAddress {
		ip, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("AssignPrivateIpAddresses to %s returned bad address %q [RequestId %s]", eniID, s, resp.RequestId)
		}
		out = append(out, ip)
	}
	return out, nil
}

// AssignSpecificIPs implements Cloud.
func (c *Client) AssignSpecificIPs(ctx context.Context, eniID string, ips []netip.Addr, token string) ([]netip.Addr, error) {
	if len(ips) < 1 || len(ips) > MaxIPsPerCall {
		return nil, fmt.Errorf("AssignSpecificIPs to %s: %d addresses; allowed 1..%d", eniID, len(ips), MaxIPsPerCall)
	}
	if token == "" {
		return nil, fmt.Errorf("AssignSpecificIPs to %s: empty token; generate one per logical assign and record it first", eniID)
	}
	want := make([]string, len(ips))
	for i, ip := range ips {
		want[i] = ip.String()
	}
	var resp *ecs.AssignPrivateIpAddressesResponse
	err := c.call(ctx, actAssignIPs, func() error {
		req := ecs.CreateAssignPrivateIpAddressesRequest()
		req.NetworkInterfaceId = eniID
		addrs := slices.Clone(want)
		req.PrivateIpAddress = &addrs
		req.ClientToken = token
		r, err := c.ecs.AssignPrivateIpAddresses(req)
		resp = r
		return err
	})
	if err != nil {
		return nil, err
	}
	out, err := assignedAddrs(eniID, resp)
	if err != nil {
		return nil, err
	}
	for _, ip := range ips {
		if !slices.Contains(out, ip) {
			return nil, fmt.Errorf("AssignPrivateIpAddresses to %s asked for %v and answered %v [RequestId %s]: the cloud did not assign %s",
				eniID, ips, out, resp.RequestId, ip)
		}
	}
	return out, nil
}

// UnassignPrivateIPs implements Cloud.
func (c *Client) UnassignPrivateIPs(ctx context.Context, eniID string, ips []netip.Addr) error {
	if len(ips) == 0 {
		return nil
	}
	if len(ips) > MaxIPsPerCall {
		return fmt.Errorf("UnassignPrivateIPs from %s: %d addresses; at most %d per call", eniID, len(ips), MaxIPsPerCall)
	}
	unassign := func(ips []netip.Addr) error {
		return c.call(ctx, actUnassignIPs, func() error {
			req := ecs.CreateUnassignPrivateIpAddressesRequest()
			req.NetworkInterfaceId = eniID
			s := make([]string, len(ips))
			for i, ip := range ips {
				s[i] = ip.String()
			}
			req.PrivateIpAddress = &s
			_, err := c.ecs.UnassignPrivateIpAddresses(req)
			return err
		})
	}
	gone := func(err error) bool {
		var ae *APIError
		return asAPIError(err, &ae) && ae.Code == "InvalidIp.IpUnassigned"
	}
	err := unassign(ips)
	if err == nil || isNotFound(err) {
		return nil
	}
	if !gone(err) || len(ips) == 1 {
		if gone(err) {
			return nil
		}
		return err
	}
	// Some are already gone (an earlier attempt, or a crash before our bookkeeping). A listing
	// cannot say which (it lags behind unassignments), so remove them one by one: for a single
	// address, "not assigned" means done.
	for _, ip := range ips {
		if err := unassign([]netip.Addr{ip}); err != nil && !gone(err) && !isNotFound(err) {
			return err
		}
	}
	return nil
}

// VSwitches implements Cloud.
func (c *Client) VSwitches(ctx context.Context, ids []string) ([]VSwitch, error) {
	out := make([]VSwitch, 0, len(ids))
	for _, id := range ids {
		var resp *vpc.DescribeVSwitchesResponse
		err := c.call(ctx, actDescribeVSwitches, func() error {
			req := vpc.CreateDescribeVSwitchesRequest()
			req.VSwitchId = id
			r, err := c.vpc.DescribeVSwitches(req)
			resp = r
			return err
		})
		if err != nil {
			return nil, err
		}
		found := false
		for _, v := range resp.VSwitches.VSwitch {
			if v.VSwitchId != id {
				continue
			}
			p, err := netip.ParsePrefix(v.CidrBlock)
			if err != nil {
				return nil, fmt.Errorf("DescribeVSwitches %s: bad CidrBlock %q [RequestId %s]", id, v.CidrBlock, resp.RequestId)
			}
			out = append(out, VSwitch{ID: v.VSwitchId, ZoneID: v.ZoneId, CIDR: p, Available: int(v.AvailableIpAddressCount)})
			found = true
		}
		if !found {
			return nil, &APIError{Action: actDescribeVSwitches, Code: "InvalidVSwitchId.NotFound", RequestID: resp.RequestId,
				Message: fmt.Sprintf("vSwitch %s not found in region %s; check eni_conf vswitches", id, c.opts.RegionID),
				// The IDs come from eni_conf: only a config change fixes this, as with the
				// cloud's own InvalidVSwitchId codes.
				cause: ErrBadVSwitch}
		}
	}
	return out, nil
}

// waitFor polls one ENI until done reports true, an error, or the wait times out. done gets
// nil when the ENI no longer exists.
//
// A poll that fails with Throttling or a transient error, after the call's own retries, says
// nothing about the ENI: the wait polls on until its deadline. (Ending the wait there failed
// an attach the cloud had completed, leaving a member ENI in use for GC to find, on a run of
// throttled listings well inside WaitTimeout.) Any other failure ends the wait at once.
func (c *Client) waitFor(ctx context.Context, eniID, what string, done func(*ENI) (bool, error)) (ENI, error) {
	deadline := time.Now().Add(c.opts.WaitTimeout)
	for {
		enis, err := c.ListENIs(ctx, ENIFilter{IDs: []string{eniID}})
		transient := err != nil && ctx.Err() == nil && (errors.Is(err, ErrThrottled) || errors.Is(err, ErrTransient))
		if err != nil && !transient {
			return ENI{}, fmt.Errorf("waiting for ENI %s to be %s: %w", eniID, what, err)
		}
		var status string
		if !transient {
			var cur *ENI
			if len(enis) > 0 {
				cur = &enis[0]
			}
			ok, err := done(cur)
			if err != nil {
				return ENI{}, err
			}
			if ok {
				if cur == nil {
					return ENI{}, nil
				}
				return *cur, nil
			}
			status = "gone"
			if cur != nil {
				status = cur.Status
			}
		} else {
			status = fmt.Sprintf("unknown: the last listing failed: %v", err)
			c.log.Debug("listing failed while waiting for an ENI; polling on", zap.String("eni", eniID),
				zap.String("waitingFor", what), zap.Error(err))
		}
		if time.Now().After(deadline) {
			return ENI{}, fmt.Errorf("ENI %s not %s after %s (status %s): %w", eniID, what, c.opts.WaitTimeout, status, ErrTimeout)
		}
		t := time.NewTimer(c.opts.PollInterval)
		select {
		case <-ctx.Done():
			t.Stop()
			return ENI{}, fmt.Errorf("waiting for ENI %s to be %s: %w", eniID, what, ctx.Err())
		case <-t.C:
		}
	}
}

func requestsInt(n int) requests.Integer { return requests.NewInteger(n) }
