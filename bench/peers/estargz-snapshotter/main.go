// Command estargz-snapshotter is the eStargz peer of `rafs bench --against estargz`:
// the stargz snapshotter of Debian's golang-github-containerd-stargz-snapshotter-dev
// library, served to containerd as a proxy snapshot plugin on a unix socket.
//
// It is the same wiring as upstream's containerd-stargz-grpc daemon, reduced to
// what the benchmark needs: the library's service package builds the snapshotter
// (its FUSE filesystem, the registry resolver and the overlay snapshotter around
// it), containerd's snapshotservice adapts it to the snapshots gRPC API, and
// SIGTERM/SIGINT stop the server and close the snapshotter, which unmounts every
// layer it mounted. Credentials come from ~/.docker/config.json, as upstream's.
//
// The benchmark builds this with bench/peers/build.py (GOPATH mode over Debian's
// Go sources in /usr/share/gocode) and caches the binary under
// /var/cache/rafs/peers/.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/containerd/stargz-snapshotter/service/keychain/dockerconfig"
	"github.com/containerd/stargz-snapshotter/service/resolver"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "", "unix socket to serve the snapshots API on (required)")
	root := flag.String("root", "", "directory for snapshots, layer caches and FUSE mounts (required)")
	logLevel := flag.String("log-level", "info", "logrus level: debug, info, warn, error")
	noPrefetch := flag.Bool("no-prefetch", false, "do not prefetch the prioritized files of optimized images")
	noBackgroundFetch := flag.Bool("no-background-fetch", false, "do not fetch whole layers in the background")
	flag.Parse()
	if *address == "" || *root == "" {
		fmt.Fprintln(os.Stderr, "estargz-snapshotter: error: --address and --root are required")
		os.Exit(2)
	}
	if err := run(*address, *root, *logLevel, *noPrefetch, *noBackgroundFetch); err != nil {
		fmt.Fprintf(os.Stderr, "estargz-snapshotter: error: %v\n", err)
		os.Exit(1)
	}
}

func run(address, root, logLevel string, noPrefetch, noBackgroundFetch bool) error {
	level, err := logrus.ParseLevel(logLevel)
	if err != nil {
		return err
	}
	logrus.SetLevel(level)
	ctx := log.WithLogger(context.Background(), log.L)

	// Library defaults everywhere, except the two switches the benchmark sets.
	var cfg service.Config
	cfg.Config.NoPrefetch = noPrefetch
	cfg.Config.NoBackgroundFetch = noBackgroundFetch
	creds := []resolver.Credential{dockerconfig.NewDockerconfigKeychain(ctx)}
	sn, err := service.NewStargzSnapshotterService(ctx, root, &cfg, service.WithCredsFuncs(creds...))
	if err != nil {
		return fmt.Errorf("snapshotter: %w", err)
	}
	defer sn.Close() // unmounts every layer this process mounted

	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))
	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		return err
	}
	if err := os.RemoveAll(address); err != nil { // a stale socket of an earlier run
		return err
	}
	listener, err := net.Listen("unix", address)
	if err != nil {
		return err
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	served := make(chan error, 1)
	go func() { served <- rpc.Serve(listener) }()
	log.G(ctx).Infof("serving the snapshots API on %s (root %s)", address, root)
	select {
	case sig := <-stop:
		log.G(ctx).Infof("%v: stopping", sig)
		rpc.Stop()
		return nil
	case err := <-served:
		return err
	}
}
