// Package v1alpha2 is a stub of k8s.io/cri-api's CRI v1alpha2 API, which Debian
// bookworm does not package: stargz-snapshotter's service/resolver (cri.go) uses
// only its AuthConfig type, for the CRI-based keychain that lazysnap-bench's peer
// never enables. The fields are those of the real type.
package v1alpha2

// AuthConfig holds the information to authenticate to a registry.
type AuthConfig struct {
	Username      string
	Password      string
	Auth          string
	ServerAddress string
	IdentityToken string
	RegistryToken string
}
