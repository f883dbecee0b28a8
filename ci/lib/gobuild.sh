# shellcheck shell=bash
# Builds the test bed's Go tools into a cache keyed by version. Sourced by ci/setup.
# Each tool lands in $JOBTIDE_CACHE/bin/<tool>-<version>/ and is linked into
# $JOBTIDE_CACHE/bin/current/, so a second run with the same versions builds nothing.

KUBE_STAGING_MODULES="api apiextensions-apiserver apimachinery apiserver cli-runtime client-go
cloud-provider cluster-bootstrap code-generator component-base component-helpers
controller-manager cri-api cri-client csi-translation-lib dynamic-resource-allocation
endpointslice externaljwt kms kube-aggregator kube-controller-manager kube-proxy
kube-scheduler kubectl kubelet metrics mount-utils pod-security-admission sample-apiserver
sample-cli-plugin sample-controller"

KUBE_COMMANDS="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl"

# go_tool_dir NAME VERSION -> the folder that holds that build
go_tool_dir() { printf '%s/bin/%s-%s' "$JOBTIDE_CACHE" "$1" "$2"; }

# link_current DIR: expose every binary of DIR in the bin/current folder on PATH.
link_current() {
  mkdir -p "$JOBTIDE_CACHE/bin/current"
  for f in "$1"/*; do ln -sfn "$f" "$JOBTIDE_CACHE/bin/current/$(basename "$f")"; done
}

# go_install NAME VERSION PACKAGE [LDFLAGS [BINARY [TAGS]]]: plain `go install` for modules
# without replaces. BINARY renames a command whose name another tool already has (Karpenter's
# kwok provider is a command called `kwok`, like kwok itself); TAGS are Go build tags.
go_install() {
  local name=$1 version=$2 pkg=$3 dir t0=$SECONDS
  dir=$(go_tool_dir "$name" "$version")
  if [ ! -f "$dir/.done" ]; then
    echo "setup: building $name $version"
    mkdir -p "$dir"
    # The same -trimpath as the wrapper-module builds, so packages they share at the same
    # version compile once into GOCACHE; no symbol tables or DWARF: shorter links.
    GOBIN="$dir" CGO_ENABLED=0 go install -trimpath -tags "${6:-}" -ldflags "-s -w${4:+ $4}" \
      "$pkg@$version"
    if [ -n "${5:-}" ]; then mv "$dir/$(basename "$pkg")" "$dir/$5"; fi
    touch "$dir/.done"
    echo "setup: built $name in $((SECONDS - t0)) s"
  fi
  link_current "$dir"
}

# build_kubernetes: the control plane and node binaries from k8s.io/kubernetes, through a
# wrapper module that pins every staging module (k8s.io/kubernetes's own go.mod points them
# at ./staging, which a module download does not have).
build_kubernetes() {
  local v=$KUBERNETES_VERSION dir mod staging minor ldflags pkgs="" m c t0=$SECONDS
  dir=$(go_tool_dir kubernetes "$v")
  if [ ! -f "$dir/.done" ]; then
    echo "setup: building Kubernetes $v (cold: 10-20 minutes on 2 cores)"
    staging="v0.${v#v1.}"
    minor=$(echo "$v" | cut -d. -f2)
    mod="$JOBTIDE_CACHE/gomod/kubernetes-$v"
    mkdir -p "$mod" "$dir"
    {
      echo "module jobtide.local/testbed/kubernetes"
      echo
      echo "go 1.24"
      echo
      echo "require k8s.io/kubernetes $v"
      echo
      for m in $KUBE_STAGING_MODULES; do echo "replace k8s.io/$m => k8s.io/$m $staging"; done
    } >"$mod/go.mod"
    {
      echo "//go:build tools"
      echo
      echo "package tools"
      echo
      echo "import ("
      for c in $KUBE_COMMANDS; do echo "	_ \"k8s.io/kubernetes/cmd/$c\""; done
      echo ")"
    } >"$mod/tools.go"
    ldflags="-s -w"
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ldflags="$ldflags -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor"
      ldflags="$ldflags -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
    done
    for c in $KUBE_COMMANDS; do pkgs="$pkgs k8s.io/kubernetes/cmd/$c"; done
    (cd "$mod" && { go mod tidy -e >/dev/null 2>&1 || go mod tidy; })
    # shellcheck disable=SC2086
    (cd "$mod" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$dir/" $pkgs)
    touch "$dir/.done"
    echo "setup: built Kubernetes in $((SECONDS - t0)) s"
  fi
  link_current "$dir"
}

# build_etcd: etcd's server module has replaces too, so build it from a wrapper module.
build_etcd() {
  local v=$ETCD_VERSION dir mod t0=$SECONDS
  dir=$(go_tool_dir etcd "$v")
  if [ ! -f "$dir/.done" ]; then
    echo "setup: building etcd $v"
    mod="$JOBTIDE_CACHE/gomod/etcd-$v"
    mkdir -p "$mod" "$dir"
    printf 'module jobtide.local/testbed/etcd\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$v" >"$mod/go.mod"
    printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' >"$mod/tools.go"
    (cd "$mod" && go mod tidy && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$dir/etcd" go.etcd.io/etcd/server/v3)
    touch "$dir/.done"
    echo "setup: built etcd in $((SECONDS - t0)) s"
  fi
  link_current "$dir"
}

# CoreDNS serves only the real node's cluster DNS (jobtide_testbed/node.py's COREFILE), so it is
# built with just the plugins that Corefile names: about half the code of the default build,
# which pulls in every cloud provider's SDK. Add a plugin here when the Corefile gains one.
COREDNS_PLUGINS="bind cache errors kubernetes"

# build_coredns: a wrapper module whose main imports only COREDNS_PLUGINS.
build_coredns() {
  local v=$COREDNS_VERSION dir mod p t0=$SECONDS
  # The plugin set is part of the key: changing it builds a new binary.
  dir=$(go_tool_dir coredns "$v-$(echo "$COREDNS_PLUGINS" | sha256sum | cut -c1-8)")
  if [ ! -f "$dir/.done" ]; then
    echo "setup: building coredns $v ($COREDNS_PLUGINS)"
    mod="$JOBTIDE_CACHE/gomod/coredns-$v"
    mkdir -p "$mod" "$dir"
    printf 'module jobtide.local/testbed/coredns\n\ngo 1.24\n\nrequire github.com/coredns/coredns %s\n' "$v" >"$mod/go.mod"
    {
      echo "package main"
      echo
      echo "import ("
      echo "	\"github.com/coredns/coredns/coremain\""
      for p in $COREDNS_PLUGINS; do echo "	_ \"github.com/coredns/coredns/plugin/$p\""; done
      echo ")"
      echo
      echo "func main() { coremain.Run() }"
    } >"$mod/main.go"
    (cd "$mod" && go mod tidy && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$dir/coredns" .)
    touch "$dir/.done"
    echo "setup: built coredns in $((SECONDS - t0)) s"
  fi
  link_current "$dir"
}

# build_promtool: Prometheus' promtool without its service-discovery plugins (the build tag
# `remove_all_sd`; rule checks and rule unit tests need none): 1,117 packages to build instead
# of 1,364 (v0.316.0), the cloud providers' SDKs among those left out.
build_promtool() {
  go_install promtool "$PROMTOOL_VERSION" github.com/prometheus/prometheus/cmd/promtool \
    "-X github.com/prometheus/common/version.Version=$PROMTOOL_VERSION" "" remove_all_sd
}

# build_kube_score: kube-score with its version stamped in (`kube-score version`).
build_kube_score() {
  go_install kube-score "$KUBE_SCORE_VERSION" github.com/zegl/kube-score/cmd/kube-score \
    "-X main.version=$KUBE_SCORE_VERSION"
}

# build_registry: the CNCF distribution registry, the test bed's OCI registry
# (jobtide_testbed/registry.py). Its version ldflag makes `registry --version` name the pin.
build_registry() {
  go_install registry "$REGISTRY_VERSION" github.com/distribution/distribution/v3/cmd/registry \
    "-X github.com/distribution/distribution/v3/version.version=$REGISTRY_VERSION"
}

# build_kube_router: kube-router, of which the test bed runs only the network policy controller
# (jobtide_testbed/netpol.py); its version ldflag makes `kube-router --version` name the pin.
build_kube_router() {
  go_install kube-router "$KUBE_ROUTER_VERSION" \
    github.com/cloudnativelabs/kube-router/v2/cmd/kube-router \
    "-X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$KUBE_ROUTER_VERSION"
}
