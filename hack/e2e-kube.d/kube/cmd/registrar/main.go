// Command registrar stands in for node-driver-registrar in hack/e2e-kube: the
// upstream module cannot be fetched from the Go module proxy this machine
// reaches (its v2 tags have no /v2 module path, and the proxy refuses both
// pseudo-versions and version lists), so this does the same job with the
// same flags the chart passes: it asks the driver's socket for its name,
// serves kubelet's plugin-registration API (v1) on
// <registration dir>/<name>-reg.sock, and answers /healthz.
package main

import (
	"context"
	"flag"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type registrar struct {
	name, endpoint string
}

func (r registrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.name,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r registrar) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !s.PluginRegistered {
		// Like upstream: exit so the container restarts and registers again.
		log.Fatalf("kubelet refused the registration: %s", s.Error)
	}
	log.Printf("registered with kubelet as %s", r.name)
	return &registerapi.RegistrationStatusResponse{}, nil
}

// driverName retries until the driver's socket answers GetPluginInfo: the
// driver container may start after this one.
func driverName(address string) string {
	for {
		conn, err := grpc.Dial("unix://"+address, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			info, err2 := csi.NewIdentityClient(conn).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
			cancel()
			conn.Close()
			if err2 == nil {
				return info.GetName()
			}
			err = err2
		}
		log.Printf("waiting for the driver at %s: %v", address, err)
		time.Sleep(2 * time.Second)
	}
}

func main() {
	csiAddress := flag.String("csi-address", "/csi/csi.sock", "the driver's socket in this container")
	kubeletPath := flag.String("kubelet-registration-path", "", "the driver's socket on the host")
	regDir := flag.String("plugin-registration-path", "/registration", "kubelet's plugins_registry")
	httpEndpoint := flag.String("http-endpoint", "", "address of /healthz")
	flag.Int("v", 0, "ignored (klog verbosity upstream)")
	flag.Parse()
	if *kubeletPath == "" {
		log.Fatal("--kubelet-registration-path is required")
	}
	name := driverName(*csiAddress)
	socket := filepath.Join(*regDir, name+"-reg.sock")
	if err := os.Remove(socket); err != nil && !os.IsNotExist(err) {
		log.Fatalf("removing stale %s: %v", socket, err)
	}
	lis, err := net.Listen("unix", socket)
	if err != nil {
		log.Fatalf("listening on %s: %v", socket, err)
	}
	server := grpc.NewServer()
	registerapi.RegisterRegistrationServer(server, registrar{name: name, endpoint: *kubeletPath})
	if *httpEndpoint != "" {
		http.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
			if _, err := os.Stat(socket); err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			w.Write([]byte("ok"))
		})
		go func() { log.Fatal(http.ListenAndServe(*httpEndpoint, nil)) }()
	}
	log.Printf("serving registration for %s on %s", name, socket)
	log.Fatal(server.Serve(lis))
}
