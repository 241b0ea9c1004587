// lazysnap-bench-stargz: stargz-snapshotter (Debian's packaged library,
// github.com/containerd/stargz-snapshotter v0.12) served as a containerd
// snapshots gRPC service on a unix socket, as its cmd/containerd-stargz-grpc
// does. It is lazysnap-bench's peer, not part of lazysnap: the bench starts one
// per run with an empty --root and the stock settings plus the resolver entry
// that reaches its plain-HTTP registry.
//
// Build with bench/peer/build.sh (GOPATH mode, no module downloads).
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
	"github.com/pelletier/go-toml"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "/run/lazysnap-bench-stargz/stargz.sock", "unix socket to serve the snapshots API on")
	root := flag.String("root", "/var/lib/lazysnap-bench-stargz", "root directory of the snapshotter")
	configPath := flag.String("config", "", "TOML configuration in stargz-snapshotter's format (empty: defaults)")
	logLevel := flag.String("log-level", "info", "log level (debug, info, warn, error)")
	flag.Parse()

	lvl, err := logrus.ParseLevel(*logLevel)
	if err != nil {
		fatalf("bad --log-level: %v", err)
	}
	logrus.SetOutput(os.Stderr)
	logrus.SetLevel(lvl)
	logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, TimestampFormat: log.RFC3339NanoFixed})
	ctx := log.WithLogger(context.Background(), log.L)

	// As containerd-stargz-grpc: pelletier's go-toml v1, which also applies the
	// `default:` struct tags of the config (fuse.direct = true, ...).
	var config service.Config
	if *configPath != "" {
		tree, err := toml.LoadFile(*configPath)
		if err != nil {
			fatalf("loading %s: %v", *configPath, err)
		}
		if err := tree.Unmarshal(&config); err != nil {
			fatalf("parsing %s: %v", *configPath, err)
		}
	} else {
		tree, _ := toml.TreeFromMap(map[string]interface{}{})
		if err := tree.Unmarshal(&config); err != nil {
			fatalf("defaults: %v", err)
		}
	}

	if err := os.MkdirAll(*root, 0700); err != nil {
		fatalf("creating %s: %v", *root, err)
	}
	rs, err := service.NewStargzSnapshotterService(ctx, *root, &config)
	if err != nil {
		fatalf("starting the snapshotter: %v", err)
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(rs))

	if err := os.MkdirAll(filepath.Dir(*address), 0700); err != nil {
		fatalf("creating the socket's directory: %v", err)
	}
	if err := os.RemoveAll(*address); err != nil {
		fatalf("removing an old socket: %v", err)
	}
	l, err := net.Listen("unix", *address)
	if err != nil {
		fatalf("listening on %s: %v", *address, err)
	}
	errc := make(chan error, 1)
	go func() { errc <- rpc.Serve(l) }()
	log.G(ctx).WithField("address", *address).WithField("root", *root).Info("serving")

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	select {
	case s := <-sig:
		log.G(ctx).Infof("got %v, shutting down", s)
	case err := <-errc:
		log.G(ctx).WithError(err).Error("gRPC server stopped")
	}
	rpc.Stop()
	// Unmounts every layer (committed ones too) and closes the metadata store.
	if err := rs.Close(); err != nil {
		log.G(ctx).WithError(err).Warn("closing the snapshotter")
	}
	_ = os.RemoveAll(*address)
}

func fatalf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "lazysnap-bench-stargz: "+format+"\n", args...)
	os.Exit(1)
}
