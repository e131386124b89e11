// Package v1alpha2 stands in for k8s.io/cri-api/pkg/apis/runtime/v1alpha2, which
// Debian bookworm does not package. The stargz library's resolver (the only part
// of it the benchmark's peer links) uses nothing from it but the AuthConfig
// message, declared here with the fields the resolver reads.
package v1alpha2

// AuthConfig holds registry credentials, as in the CRI API.
type AuthConfig struct {
	Username      string
	Password      string
	Auth          string
	ServerAddress string
	IdentityToken string
	RegistryToken string
}
