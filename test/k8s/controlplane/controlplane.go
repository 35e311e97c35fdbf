// Package controlplane runs a real Kubernetes control plane (etcd, kube-apiserver and,
// optionally, kube-controller-manager) as child processes on loopback, for tests and the
// demo. tern's inputs are Kubernetes objects; this package makes the evidence come from the
// real API server, with real admission, validation, status subresources, watches and the
// real EndpointSlice controller, rather than from a fake clientset.
//
// The binaries come from test/k8s/build.sh (see BinDir). Nothing is routed: the service
// CIDR is only a number the apiserver allocates ClusterIPs from, and every listener is on
// 127.0.0.1 in the caller's network namespace.
package controlplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// KubernetesVersion is the release test/k8s/build.sh builds.
const KubernetesVersion = "v1.37.2"

// DefaultServiceCIDR is the service range used when Options.ServiceCIDR is empty.
const DefaultServiceCIDR = "10.96.0.0/16"

// DefaultControllers returns the kube-controller-manager controllers a cluster without
// kubelets can use. Node lifecycle is left out on purpose: with no kubelet heart-beating, it
// would taint every Node unreachable and, minutes later, evict the pods tests created; so is
// pod garbage collection, which deletes pods bound to Nodes a test never registered.
func DefaultControllers() []string {
	return []string{
		"endpointslice-controller",
		"endpointslice-mirroring-controller",
		"endpoints-controller",
		"namespace-controller",
		"serviceaccount-controller",
		"serviceaccount-token-controller",
		"garbage-collector-controller",
		"root-ca-certificate-publisher-controller",
		"clusterrole-aggregation-controller",
		"replicaset-controller",
		"deployment-controller",
	}
}

// binaryNames are the files BinDir must hold; build.sh produces all four.
func binaryNames() []string {
	return []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-proxy"}
}

// Options configure Start. The zero value (plus a built BinDir) is a working control plane.
type Options struct {
	// BinDir holds etcd, kube-apiserver, kube-controller-manager; empty means BinDir().
	BinDir string
	// DataDir receives certificates, kubeconfigs, etcd data and one log file per process.
	// Empty means a new temporary directory that Stop removes; a directory the caller gave
	// is left in place so that logs survive a failure.
	DataDir string
	// ServiceCIDR is --service-cluster-ip-range; empty means DefaultServiceCIDR.
	ServiceCIDR string
	// ControllerManager also starts kube-controller-manager (EndpointSlices, namespace
	// deletion, default ServiceAccounts). Without it the ServiceAccount admission plugin is
	// disabled so that pods can still be created.
	ControllerManager bool
	// Controllers overrides DefaultControllers().
	Controllers []string
	// ExtraAPIServerArgs are appended to the kube-apiserver command line (later flags win).
	ExtraAPIServerArgs []string
	// StartTimeout bounds each wait for a component to become ready; default 60 s.
	StartTimeout time.Duration
	// Logger receives lifecycle logs; nil means no logs.
	Logger *zap.Logger
}

// ControlPlane is a running etcd + kube-apiserver (+ kube-controller-manager).
type ControlPlane struct {
	log         *zap.Logger
	dataDir     string
	removeData  bool
	timeout     time.Duration
	sp          *spawner
	etcd        *process
	etcdURL     string
	apiserver   *process
	kcm         *process
	apiURL      string
	kcmURL      string
	restConfig  *rest.Config
	kubeconfig  string
	healthCheck *http.Client // trusts our CA, presents the admin certificate
}

// BinDir returns the directory holding the control-plane binaries: $TERN_K8S_BIN_DIR, or
// the cache directory test/k8s/build.sh uses by default for this Go version. It fails, with
// what to run, when any binary is missing.
func BinDir() (string, error) {
	dir := os.Getenv("TERN_K8S_BIN_DIR")
	if dir == "" {
		dir = filepath.Join("/var/cache/tern/k8s", KubernetesVersion+"-"+runtime.Version())
	}
	for _, b := range binaryNames() {
		st, err := os.Stat(filepath.Join(dir, b))
		if err != nil || st.Mode()&0o111 == 0 {
			return "", fmt.Errorf("kubernetes binary %s missing in %s: run test/k8s/build.sh (set TERN_K8S_BIN_DIR to the same directory for both)", b, dir)
		}
	}
	return dir, nil
}

// Start brings up etcd, then kube-apiserver (waiting for /readyz), then, if asked,
// kube-controller-manager (waiting for /healthz). On error everything started is stopped.
// ctx bounds start-up only; the processes live until Stop.
func Start(ctx context.Context, o Options) (_ *ControlPlane, retErr error) {
	if o.BinDir == "" {
		dir, err := BinDir()
		if err != nil {
			return nil, err
		}
		o.BinDir = dir
	}
	if o.ServiceCIDR == "" {
		o.ServiceCIDR = DefaultServiceCIDR
	}
	if o.StartTimeout == 0 {
		o.StartTimeout = 60 * time.Second
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Controllers == nil {
		o.Controllers = DefaultControllers()
	}
	firstServiceIP, err := firstServiceIP(o.ServiceCIDR)
	if err != nil {
		return nil, err
	}
	c := &ControlPlane{log: o.Logger.With(zap.String("component", "controlplane")), timeout: o.StartTimeout}
	if o.DataDir == "" {
		dir, err := os.MkdirTemp("", "tern-controlplane-")
		if err != nil {
			return nil, fmt.Errorf("create control-plane data dir: %w", err)
		}
		o.DataDir, c.removeData = dir, true
	} else if err := os.MkdirAll(o.DataDir, 0o755); err != nil {
		return nil, fmt.Errorf("create control-plane data dir %s: %w", o.DataDir, err)
	}
	c.dataDir = o.DataDir
	c.sp = newSpawner()
	defer func() {
		if retErr != nil {
			if err := c.Stop(); err != nil {
				c.log.Warn("cleanup after failed start", zap.Error(err))
			}
		}
	}()
	began := time.Now()

	pki, err := c.writePKI(firstServiceIP)
	if err != nil {
		return nil, err
	}
	if err := c.startEtcd(ctx, o.BinDir); err != nil {
		return nil, err
	}
	etcdReady := time.Now()
	if err := c.startAPIServer(ctx, o, pki); err != nil {
		return nil, err
	}
	apiReady := time.Now()
	if o.ControllerManager {
		if err := c.startControllerManager(ctx, o, pki); err != nil {
			return nil, err
		}
	}
	c.log.Info("control plane ready",
		zap.String("apiserver", c.apiURL),
		zap.String("kubeconfig", c.kubeconfig),
		zap.Duration("etcd", etcdReady.Sub(began)),
		zap.Duration("apiserver", apiReady.Sub(etcdReady)),
		zap.Duration("total", time.Since(began)))
	return c, nil
}

// pkiFiles are the paths the components are started with.
type pkiFiles struct {
	caCert, caKey               string
	servingCert, servingKey     string
	kcmServingCert, kcmServKey  string
	saPub, saKey                string
	kcmKubeconfig               string
	adminCertPEM, adminKeyPEM   []byte
	caPEM                       []byte
	kcmClientPEM, kcmClientKPEM []byte
}

func (c *ControlPlane) writePKI(serviceIP net.IP) (*pkiFiles, error) {
	dir := filepath.Join(c.dataDir, "pki")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", dir, err)
	}
	ca, err := newCA("tern-test-kubernetes-ca")
	if err != nil {
		return nil, err
	}
	loopback := []net.IP{net.ParseIP("127.0.0.1")}
	leaves := []struct {
		name string
		req  certRequest
	}{
		{"apiserver", certRequest{
			commonName: "kube-apiserver",
			dnsNames:   []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
			ips:        append(loopback, serviceIP),
			usage:      []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		}},
		{"controller-manager-serving", certRequest{
			commonName: "kube-controller-manager", dnsNames: []string{"localhost"}, ips: loopback,
			usage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		}},
		// system:masters bypasses authorization: the admin identity tests and the demo use.
		{"admin", certRequest{
			commonName: "tern-admin", organization: []string{"system:masters"},
			usage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		}},
		// The identity the default RBAC policy grants the controller-manager's own role.
		{"controller-manager-client", certRequest{
			commonName: "system:kube-controller-manager",
			usage:      []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		}},
	}
	p := &pkiFiles{caPEM: ca.certPEM}
	if p.caCert, p.caKey, err = ca.write(dir, "ca"); err != nil {
		return nil, err
	}
	for _, l := range leaves {
		kp, err := ca.issue(l.req)
		if err != nil {
			return nil, err
		}
		certPath, keyPath, err := kp.write(dir, l.name)
		if err != nil {
			return nil, err
		}
		switch l.name {
		case "apiserver":
			p.servingCert, p.servingKey = certPath, keyPath
		case "controller-manager-serving":
			p.kcmServingCert, p.kcmServKey = certPath, keyPath
		case "admin":
			p.adminCertPEM, p.adminKeyPEM = kp.certPEM, kp.keyPEM
		case "controller-manager-client":
			p.kcmClientPEM, p.kcmClientKPEM = kp.certPEM, kp.keyPEM
		}
	}
	if p.saPub, p.saKey, err = writeServiceAccountKeys(dir); err != nil {
		return nil, err
	}

	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	admin, err := tls.X509KeyPair(p.adminCertPEM, p.adminKeyPEM)
	if err != nil {
		return nil, fmt.Errorf("load admin key pair: %w", err)
	}
	c.healthCheck = &http.Client{
		Timeout: 2 * time.Second,
		Transport: &http.Transport{
			Proxy:           nil, // never send loopback health checks through a proxy
			TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{admin}},
		},
	}
	return p, nil
}

func (c *ControlPlane) startEtcd(ctx context.Context, binDir string) error {
	dataDir := filepath.Join(c.dataDir, "etcd")
	return c.startWithFreshPorts(ctx, "etcd", func() (*process, string, error) {
		ports, err := freePorts(2)
		if err != nil {
			return nil, "", err
		}
		client := "http://127.0.0.1:" + strconv.Itoa(ports[0])
		peer := "http://127.0.0.1:" + strconv.Itoa(ports[1])
		p := &process{
			name: "etcd", path: filepath.Join(binDir, "etcd"), log: c.log,
			logPath: filepath.Join(c.dataDir, "etcd.log"),
			args: []string{
				"--name=tern-test",
				"--data-dir=" + dataDir,
				"--listen-client-urls=" + client,
				"--advertise-client-urls=" + client,
				"--listen-peer-urls=" + peer,
				"--initial-advertise-peer-urls=" + peer,
				"--initial-cluster=tern-test=" + peer,
				"--initial-cluster-state=new",
				// A throwaway store: durability buys nothing and fsync costs a lot on
				// shared test machines.
				"--unsafe-no-fsync",
				"--log-level=warn",
			},
		}
		c.etcd, c.etcdURL = p, client
		return p, client + "/health", nil
	})
}

func (c *ControlPlane) startAPIServer(ctx context.Context, o Options, pki *pkiFiles) error {
	err := c.startWithFreshPorts(ctx, "kube-apiserver", func() (*process, string, error) {
		ports, err := freePorts(1)
		if err != nil {
			return nil, "", err
		}
		port := strconv.Itoa(ports[0])
		args := []string{
			"--etcd-servers=" + c.etcdURL,
			"--bind-address=127.0.0.1",
			"--secure-port=" + port,
			// 127.0.0.1 is refused as an advertise address unless nothing reconciles
			// the "kubernetes" Service's endpoints to it.
			"--advertise-address=127.0.0.1",
			"--endpoint-reconciler-type=none",
			"--tls-cert-file=" + pki.servingCert,
			"--tls-private-key-file=" + pki.servingKey,
			"--client-ca-file=" + pki.caCert,
			"--authorization-mode=Node,RBAC",
			"--service-cluster-ip-range=" + o.ServiceCIDR,
			"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
			"--service-account-key-file=" + pki.saPub,
			"--service-account-signing-key-file=" + pki.saKey,
			"--allow-privileged=true",
			// Without a watch grace period the apiserver leaves open watches (the
			// controller-manager's, a test's informers) to the 60 s shutdown timeout,
			// so every Stop and restart would wait that long; with it, they are drained
			// and shutdown takes about a second.
			"--shutdown-watch-termination-grace-period=2s",
			"--profiling=false",
		}
		if !o.ControllerManager {
			// Nothing would create the "default" ServiceAccount the plugin insists on.
			args = append(args, "--disable-admission-plugins=ServiceAccount")
		}
		args = append(args, o.ExtraAPIServerArgs...)
		c.apiURL = "https://127.0.0.1:" + port
		c.apiserver = &process{
			name: "kube-apiserver", path: filepath.Join(o.BinDir, "kube-apiserver"), log: c.log,
			logPath: filepath.Join(c.dataDir, "kube-apiserver.log"), args: args,
		}
		return c.apiserver, c.apiURL + "/readyz", nil
	})
	if err != nil {
		return err
	}
	// /readyz does not wait for the apiserver's own bootstrap objects. The "kubernetes"
	// Service is the last of them, and Service creates race the default ServiceCIDR until
	// it exists; clients should see a cluster as kubeadm would hand it over.
	if err := c.waitHealthy(ctx, c.apiserver, c.apiURL+"/api/v1/namespaces/default/services/kubernetes"); err != nil {
		return fmt.Errorf("wait for the default/kubernetes Service: %w", err)
	}
	return c.writeAdminAccess(pki)
}

// writeAdminAccess builds the admin rest.Config and writes it as a kubeconfig file.
func (c *ControlPlane) writeAdminAccess(pki *pkiFiles) error {
	c.restConfig = &rest.Config{
		Host: c.apiURL,
		TLSClientConfig: rest.TLSClientConfig{
			CAData: pki.caPEM, CertData: pki.adminCertPEM, KeyData: pki.adminKeyPEM,
		},
		// Tests and benchmarks create objects in bulk; the client-side default (5 QPS)
		// would measure the limiter, not tern.
		QPS:   1000,
		Burst: 2000,
	}
	c.kubeconfig = filepath.Join(c.dataDir, "admin.kubeconfig")
	if err := writeKubeconfig(c.kubeconfig, c.apiURL, pki.caPEM, "tern-admin", pki.adminCertPEM, pki.adminKeyPEM); err != nil {
		return err
	}
	return nil
}

func (c *ControlPlane) startControllerManager(ctx context.Context, o Options, pki *pkiFiles) error {
	kubeconfig := filepath.Join(c.dataDir, "controller-manager.kubeconfig")
	if err := writeKubeconfig(kubeconfig, c.apiURL, pki.caPEM, "system:kube-controller-manager", pki.kcmClientPEM, pki.kcmClientKPEM); err != nil {
		return err
	}
	return c.startWithFreshPorts(ctx, "kube-controller-manager", func() (*process, string, error) {
		ports, err := freePorts(1)
		if err != nil {
			return nil, "", err
		}
		port := strconv.Itoa(ports[0])
		c.kcmURL = "https://127.0.0.1:" + port
		c.kcm = &process{
			name: "kube-controller-manager", path: filepath.Join(o.BinDir, "kube-controller-manager"), log: c.log,
			logPath: filepath.Join(c.dataDir, "kube-controller-manager.log"),
			args: []string{
				"--kubeconfig=" + kubeconfig,
				"--bind-address=127.0.0.1",
				"--secure-port=" + port,
				"--tls-cert-file=" + pki.kcmServingCert,
				"--tls-private-key-file=" + pki.kcmServKey,
				"--controllers=" + strings.Join(o.Controllers, ","),
				// Each controller acts as its own service account, as in a real cluster,
				// so RBAC mistakes in what tern expects of them show up here too.
				"--use-service-account-credentials=true",
				"--service-account-private-key-file=" + pki.saKey,
				"--root-ca-file=" + pki.caCert,
				"--leader-elect=false",
				"--profiling=false",
			},
		}
		return c.kcm, c.kcmURL + "/healthz", nil
	})
}

// startWithFreshPorts runs build (which picks free ports and returns the process and its
// health URL), starts the process and waits for the URL to answer 200. Picking a free port
// and binding it are not atomic, and other tests on the machine pick ports too: when the
// process dies complaining that its address is in use, it tries again with new ports.
func (c *ControlPlane) startWithFreshPorts(ctx context.Context, name string, build func() (*process, string, error)) error {
	const attempts = 3
	var lastErr error
	for i := 0; i < attempts; i++ {
		p, healthURL, err := build()
		if err != nil {
			return err
		}
		if err := p.start(c.sp); err != nil {
			return err
		}
		err = c.waitHealthy(ctx, p, healthURL)
		if err == nil {
			return nil
		}
		_ = p.stop(5 * time.Second)
		if !strings.Contains(tailFile(p.logPath, 40), "address already in use") {
			return err
		}
		c.log.Warn("port taken, retrying with new ports", zap.String("process", name), zap.Int("attempt", i+1))
		lastErr = err
	}
	return fmt.Errorf("start %s: ports kept being taken after %d attempts: %w", name, attempts, lastErr)
}

// waitHealthy polls url until it answers 200, the process exits, ctx ends or the start
// timeout passes.
func (c *ControlPlane) waitHealthy(ctx context.Context, p *process, url string) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var last string
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return fmt.Errorf("build health request %s: %w", url, err)
		}
		resp, err := c.healthCheck.Do(req)
		if err == nil {
			body := make([]byte, 512)
			n, _ := resp.Body.Read(body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(body[:n])))
		} else {
			last = err.Error()
		}
		select {
		case <-p.exited:
			return p.exitedErr()
		case <-ctx.Done():
			return fmt.Errorf("%s not healthy at %s within %s (last answer: %s; log %s):\n%s",
				p.name, url, c.timeout, last, p.logPath, tailFile(p.logPath, 15))
		case <-tick.C:
		}
	}
}

// RestConfig returns a new admin (system:masters) client configuration.
func (c *ControlPlane) RestConfig() *rest.Config { return rest.CopyConfig(c.restConfig) }

// KubeconfigPath is the admin kubeconfig in DataDir, with credentials embedded.
func (c *ControlPlane) KubeconfigPath() string { return c.kubeconfig }

// APIServerURL is https://127.0.0.1:<port>.
func (c *ControlPlane) APIServerURL() string { return c.apiURL }

// EtcdURL is etcd's plain-HTTP client URL on loopback, for tests that inspect storage.
func (c *ControlPlane) EtcdURL() string { return c.etcdURL }

// DataDir holds the certificates, kubeconfigs, etcd data and process logs.
func (c *ControlPlane) DataDir() string { return c.dataDir }

// RestartAPIServer stops kube-apiserver and starts it again with the same port, flags and
// etcd data, then waits for /readyz: clients see a real disconnect and a real resync.
func (c *ControlPlane) RestartAPIServer(ctx context.Context) error {
	if c.apiserver == nil {
		return errors.New("restart kube-apiserver: it was never started")
	}
	if err := c.apiserver.stop(30 * time.Second); err != nil {
		return fmt.Errorf("restart kube-apiserver: %w", err)
	}
	// The port was ours a moment ago; a TIME_WAIT socket does not block a listener, so
	// only a stranger grabbing it in between can make this fail.
	if err := c.apiserver.start(c.sp); err != nil {
		return fmt.Errorf("restart kube-apiserver: %w", err)
	}
	if err := c.waitHealthy(ctx, c.apiserver, c.apiURL+"/readyz"); err != nil {
		return fmt.Errorf("restart kube-apiserver: %w", err)
	}
	return nil
}

// RestartEtcd stops etcd and starts it again with the same ports, flags and data directory,
// then waits for its /health and for the apiserver's /readyz (whose etcd check must pass
// again): the apiserver sees its storage vanish and its watches on etcd break, as in an
// etcd member restart.
func (c *ControlPlane) RestartEtcd(ctx context.Context) error {
	if c.etcd == nil {
		return errors.New("restart etcd: it was never started")
	}
	if err := c.etcd.stop(30 * time.Second); err != nil {
		return fmt.Errorf("restart etcd: %w", err)
	}
	// Existing data: etcd ignores --initial-cluster-state=new and rejoins as the same member.
	if err := c.etcd.start(c.sp); err != nil {
		return fmt.Errorf("restart etcd: %w", err)
	}
	if err := c.waitHealthy(ctx, c.etcd, c.etcdURL+"/health"); err != nil {
		return fmt.Errorf("restart etcd: %w", err)
	}
	if c.apiserver != nil {
		if err := c.waitHealthy(ctx, c.apiserver, c.apiURL+"/readyz"); err != nil {
			return fmt.Errorf("restart etcd: the apiserver did not become ready again: %w", err)
		}
	}
	return nil
}

// Stop stops kube-apiserver, then kube-controller-manager, then etcd (SIGTERM, then SIGKILL
// after a grace period), and removes DataDir if Start created it. It is safe to call twice.
func (c *ControlPlane) Stop() error {
	var errs []error
	for _, p := range []*process{c.apiserver, c.kcm, c.etcd} {
		if p == nil {
			continue
		}
		if err := p.stop(15 * time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	if c.sp != nil {
		c.sp.close()
		c.sp = nil
	}
	if c.removeData && len(errs) == 0 {
		if err := os.RemoveAll(c.dataDir); err != nil {
			errs = append(errs, fmt.Errorf("remove control-plane data dir: %w", err))
		}
		c.removeData = false
	}
	return errors.Join(errs...)
}

// firstServiceIP is the address the apiserver gives the "kubernetes" Service, which its
// serving certificate must name.
func firstServiceIP(cidr string) (net.IP, error) {
	prefix, err := netip.ParsePrefix(cidr)
	if err != nil || !prefix.Addr().Is4() {
		return nil, fmt.Errorf("service CIDR %q: want an IPv4 prefix such as %s", cidr, DefaultServiceCIDR)
	}
	return net.IP(prefix.Masked().Addr().Next().AsSlice()), nil
}

// freePorts asks the kernel for n distinct free loopback ports.
func freePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free loopback port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func writeKubeconfig(path, server string, caPEM []byte, user string, certPEM, keyPEM []byte) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["tern"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: caPEM}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{ClientCertificateData: certPEM, ClientKeyData: keyPEM}
	cfg.Contexts["tern"] = &clientcmdapi.Context{Cluster: "tern", AuthInfo: user}
	cfg.CurrentContext = "tern"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return fmt.Errorf("write kubeconfig %s: %w", path, err)
	}
	return nil
}
