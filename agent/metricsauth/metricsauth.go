// Package metricsauth puts Kubernetes delegated authentication and authorization in front of
// an HTTP handler, the way kube-rbac-proxy and controller-runtime's secure metrics do: the
// caller's bearer token is checked with a TokenReview, then a SubjectAccessReview asks whether
// that user may use the non-resource URL of the request (GET /metrics is verb "get" on
// "/metrics"). A scraper is thus granted access by RBAC alone:
//
//	rules: [{nonResourceURLs: ["/metrics"], verbs: ["get"]}]
//
// The agent's own identity needs create on tokenreviews (authentication.k8s.io) and
// subjectaccessreviews (authorization.k8s.io), as in the system:auth-delegator ClusterRole.
package metricsauth

import (
	"context"
	"crypto/sha256"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Defaults of Options. They are those of the apiserver's own webhook token authenticator
// and authorizer caches: a Prometheus that scrapes every 15 s then costs the apiserver two
// reviews per node every few minutes, not every scrape.
const (
	DefaultAuthenticatedTTL   = 2 * time.Minute
	DefaultUnauthenticatedTTL = 10 * time.Second
	DefaultAllowedTTL         = 5 * time.Minute
	DefaultDeniedTTL          = 30 * time.Second
	DefaultReviewTimeout      = 10 * time.Second
	// maxCacheEntries bounds each cache: tokens are chosen by the caller, and a client sending
	// a new one on every request must not grow the agent's memory.
	maxCacheEntries = 1024
)

// Options tune a Guard. Zero fields take the defaults above.
type Options struct {
	// Open paths are served without a token: the kubelet's probes cannot present one.
	Open []string
	// How long a review's answer is reused. A revoked RoleBinding or token takes effect
	// after at most AllowedTTL / AuthenticatedTTL.
	AuthenticatedTTL, UnauthenticatedTTL, AllowedTTL, DeniedTTL time.Duration
	// ReviewTimeout bounds each call to the apiserver.
	ReviewTimeout time.Duration
	Logger        *zap.Logger
}

// Guard authenticates and authorizes requests through the Kubernetes API.
type Guard struct {
	client kubernetes.Interface
	opts   Options
	open   map[string]bool
	log    *zap.Logger

	users     ttlCache[[sha256.Size]byte, *authenticationv1.UserInfo] // nil value: not authenticated
	decisions ttlCache[string, decision]
}

type decision struct {
	allowed bool
	reason  string
}

// New builds a Guard that reviews through client, whose identity needs create on
// tokenreviews and subjectaccessreviews.
func New(client kubernetes.Interface, opts Options) *Guard {
	if opts.AuthenticatedTTL == 0 {
		opts.AuthenticatedTTL = DefaultAuthenticatedTTL
	}
	if opts.UnauthenticatedTTL == 0 {
		opts.UnauthenticatedTTL = DefaultUnauthenticatedTTL
	}
	if opts.AllowedTTL == 0 {
		opts.AllowedTTL = DefaultAllowedTTL
	}
	if opts.DeniedTTL == 0 {
		opts.DeniedTTL = DefaultDeniedTTL
	}
	if opts.ReviewTimeout == 0 {
		opts.ReviewTimeout = DefaultReviewTimeout
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	open := map[string]bool{}
	for _, p := range opts.Open {
		open[p] = true
	}
	return &Guard{client: client, opts: opts, open: open, log: opts.Logger}
}

// Wrap returns next behind the guard: 401 without a valid bearer token, 403 when RBAC does
// not allow the user the request's verb on its path, 503 when the apiserver cannot be asked.
func (g *Guard) Wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if g.open[r.URL.Path] {
			next.ServeHTTP(w, r)
			return
		}
		token, ok := bearerToken(r)
		if !ok {
			w.Header().Set("WWW-Authenticate", `Bearer realm="tern-agent"`)
			http.Error(w, "Unauthorized: send a Kubernetes bearer token (Authorization: Bearer <token>)", http.StatusUnauthorized)
			return
		}
		user, err := g.authenticate(r.Context(), token)
		if err != nil {
			g.log.Warn("metrics: cannot review a token with the Kubernetes API", zap.String("path", r.URL.Path), zap.Error(err))
			http.Error(w, "cannot check the token with the Kubernetes API now; see the agent log", http.StatusServiceUnavailable)
			return
		}
		if user == nil {
			w.Header().Set("WWW-Authenticate", `Bearer realm="tern-agent", error="invalid_token"`)
			http.Error(w, "Unauthorized: the token is not valid for this cluster", http.StatusUnauthorized)
			return
		}
		verb := verbOf(r.Method)
		d, err := g.authorize(r.Context(), user, verb, r.URL.Path)
		if err != nil {
			g.log.Warn("metrics: cannot ask the Kubernetes API for an access review", zap.String("user", user.Username),
				zap.String("path", r.URL.Path), zap.Error(err))
			http.Error(w, "cannot check access with the Kubernetes API now; see the agent log", http.StatusServiceUnavailable)
			return
		}
		if !d.allowed {
			msg := fmt.Sprintf("Forbidden: user %q may not %s %s (grant the non-resource URL through RBAC)", user.Username, verb, r.URL.Path)
			if d.reason != "" {
				msg += ": " + d.reason
			}
			http.Error(w, msg, http.StatusForbidden)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// bearerToken reads "Authorization: Bearer <token>"; the scheme is case-insensitive.
func bearerToken(r *http.Request) (string, bool) {
	scheme, token, ok := strings.Cut(strings.TrimSpace(r.Header.Get("Authorization")), " ")
	token = strings.TrimSpace(token)
	if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" {
		return "", false
	}
	return token, true
}

// verbOf maps the HTTP method to the verb the apiserver itself uses for non-resource URLs.
func verbOf(method string) string {
	switch method {
	case http.MethodGet, http.MethodHead:
		return "get"
	case http.MethodPost:
		return "create"
	case http.MethodPut:
		return "update"
	case http.MethodPatch:
		return "patch"
	case http.MethodDelete:
		return "delete"
	}
	return strings.ToLower(method)
}

// authenticate returns the token's user, nil when the apiserver says the token is not valid.
// Only a hash of the token is kept.
func (g *Guard) authenticate(ctx context.Context, token string) (*authenticationv1.UserInfo, error) {
	key := sha256.Sum256([]byte(token))
	if u, ok := g.users.get(key, time.Now()); ok {
		return u, nil
	}
	ctx, cancel := context.WithTimeout(ctx, g.opts.ReviewTimeout)
	defer cancel()
	tr, err := g.client.AuthenticationV1().TokenReviews().Create(ctx,
		&authenticationv1.TokenReview{Spec: authenticationv1.TokenReviewSpec{Token: token}}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create TokenReview: %w", err)
	}
	if tr.Status.Error != "" && !tr.Status.Authenticated {
		g.log.Debug("metrics: token not authenticated", zap.String("reason", tr.Status.Error))
	}
	if !tr.Status.Authenticated {
		g.users.put(key, nil, time.Now(), g.opts.UnauthenticatedTTL)
		return nil, nil
	}
	u := tr.Status.User
	g.users.put(key, &u, time.Now(), g.opts.AuthenticatedTTL)
	return &u, nil
}

func (g *Guard) authorize(ctx context.Context, u *authenticationv1.UserInfo, verb, path string) (decision, error) {
	key := strings.Join([]string{u.Username, u.UID, strings.Join(u.Groups, ","), fmt.Sprint(u.Extra), verb, path}, "\x00")
	if d, ok := g.decisions.get(key, time.Now()); ok {
		return d, nil
	}
	extra := map[string]authorizationv1.ExtraValue{}
	for k, v := range u.Extra {
		extra[k] = authorizationv1.ExtraValue(v)
	}
	ctx, cancel := context.WithTimeout(ctx, g.opts.ReviewTimeout)
	defer cancel()
	sar, err := g.client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{
		Spec: authorizationv1.SubjectAccessReviewSpec{User: u.Username, UID: u.UID, Groups: u.Groups, Extra: extra,
			NonResourceAttributes: &authorizationv1.NonResourceAttributes{Path: path, Verb: verb}},
	}, metav1.CreateOptions{})
	if err != nil {
		return decision{}, fmt.Errorf("create SubjectAccessReview for %s %s: %w", verb, path, err)
	}
	d := decision{allowed: sar.Status.Allowed && !sar.Status.Denied, reason: sar.Status.Reason}
	ttl := g.opts.DeniedTTL
	if d.allowed {
		ttl = g.opts.AllowedTTL
	}
	g.decisions.put(key, d, time.Now(), ttl)
	return d, nil
}

// ttlCache is a bounded map whose entries expire; the zero value is ready.
type ttlCache[K comparable, V any] struct {
	mu      sync.Mutex
	entries map[K]ttlEntry[V]
}

type ttlEntry[V any] struct {
	v       V
	expires time.Time
}

func (c *ttlCache[K, V]) get(k K, now time.Time) (V, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[k]
	if !ok || !now.Before(e.expires) {
		var zero V
		return zero, false
	}
	return e.v, true
}

// put stores v; when the cache is full it first drops expired entries, then, if still full,
// everything: a flood of distinct tokens costs reviews, never memory.
func (c *ttlCache[K, V]) put(k K, v V, now time.Time, ttl time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.entries == nil {
		c.entries = map[K]ttlEntry[V]{}
	}
	if len(c.entries) >= maxCacheEntries {
		for key, e := range c.entries {
			if !now.Before(e.expires) {
				delete(c.entries, key)
			}
		}
		if len(c.entries) >= maxCacheEntries {
			clear(c.entries)
		}
	}
	c.entries[k] = ttlEntry[V]{v: v, expires: now.Add(ttl)}
}
