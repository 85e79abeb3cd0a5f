// Command livenessprobe stands in for kubernetes-csi/livenessprobe in
// hack/e2e-kube (not fetchable from the Go module proxy reachable here, like
// node-driver-registrar): /healthz calls the driver's CSI Probe over its
// socket and answers 200 only when the driver says it is ready.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/http"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func probe(address string, timeout time.Duration) error {
	conn, err := grpc.Dial("unix://"+address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	resp, err := csi.NewIdentityClient(conn).Probe(ctx, &csi.ProbeRequest{})
	if err != nil {
		return err
	}
	if ready := resp.GetReady(); ready != nil && !ready.GetValue() {
		return fmt.Errorf("driver answered Probe with ready=false")
	}
	return nil
}

func main() {
	csiAddress := flag.String("csi-address", "/csi/csi.sock", "the driver's socket")
	httpEndpoint := flag.String("http-endpoint", ":9808", "address of /healthz")
	timeout := flag.Duration("probe-timeout", time.Second, "timeout of one Probe call")
	flag.Int("v", 0, "ignored (klog verbosity upstream)")
	flag.Parse()
	http.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		if err := probe(*csiAddress, *timeout); err != nil {
			log.Printf("probe failed: %v", err)
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Write([]byte("ok"))
	})
	log.Printf("serving /healthz on %s for %s", *httpEndpoint, *csiAddress)
	log.Fatal(http.ListenAndServe(*httpEndpoint, nil))
}
