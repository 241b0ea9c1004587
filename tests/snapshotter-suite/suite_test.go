// containerd 1.6's snapshotter conformance suite (snapshots/testsuite), run against
// lazysnapd over its unix socket through containerd's own proxy client: the client a
// [proxy_plugins] snapshotter gets. Each of the suite's cases gets a lazysnapd of its
// own (own root, own socket), stopped when the case ends.
//
// Built in GOPATH mode from Debian's golang-github-containerd-containerd-dev by run.sh;
// needs root (the suite mounts what the snapshotter returns) and LAZYSNAPD set to the
// daemon's binary.
package lazysnapsuite

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func TestLazysnapd(t *testing.T) {
	binary := os.Getenv("LAZYSNAPD")
	if binary == "" {
		t.Fatal("LAZYSNAPD must name the lazysnapd binary")
	}
	testsuite.SnapshotterSuite(t, "lazysnap", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return startDaemon(ctx, binary, root)
	})
}

// startDaemon runs lazysnapd with its state under root and returns a proxy snapshotter
// on its socket, and the function that stops it.
func startDaemon(ctx context.Context, binary, root string) (snapshots.Snapshotter, func() error, error) {
	socket := filepath.Join(root, "lazysnapd.sock")
	config := filepath.Join(root, "lazysnapd.toml")
	// No fd holder outliving the case: nothing here is mounted lazily.
	if err := os.WriteFile(config, []byte("[lazy]\nhandover = false\n"), 0o600); err != nil {
		return nil, nil, err
	}
	logPath := filepath.Join(root, "lazysnapd.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(binary, "--config", config, "--root", filepath.Join(root, "state"), "--address", socket)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Env = append(os.Environ(), "RUST_LOG=warn")
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, nil, fmt.Errorf("starting %s: %w", binary, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			logFile.Close()
			if err != nil {
				return fmt.Errorf("lazysnapd exited badly after SIGTERM: %w (log %s)", err, logPath)
			}
			return nil
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			logFile.Close()
			return fmt.Errorf("lazysnapd did not stop within 20 s of SIGTERM (log %s)", logPath)
		}
	}
	conn, err := dial(ctx, socket, exited)
	if err != nil {
		_ = stop()
		log, _ := os.ReadFile(logPath)
		return nil, nil, fmt.Errorf("connecting to lazysnapd: %w; log:\n%s", err, log)
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "lazysnap")
	return sn, func() error {
		closeErr := conn.Close()
		if err := stop(); err != nil {
			return err
		}
		return closeErr
	}, nil
}

// dial waits for the socket to accept a connection, or for the daemon to die.
func dial(ctx context.Context, socket string, exited <-chan error) (*grpc.ClientConn, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", socket); err == nil {
			c.Close()
			break
		}
		select {
		case err := <-exited:
			return nil, fmt.Errorf("lazysnapd exited before serving: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%s not served within 30 s", socket)
		}
		time.Sleep(20 * time.Millisecond)
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return grpc.DialContext(dctx, "unix://"+socket,
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}),
	)
}
