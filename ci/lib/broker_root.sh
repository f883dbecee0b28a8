# shellcheck shell=bash
# RabbitMQ from a Debian release newer than the machine's, in a root of its own. Sourced by
# ci/setup. Debian packages RabbitMQ with the Erlang it was tested on; the machine's own
# release (bookworm) has only 3.10, out of support. A debootstrap minbase root of the release
# that packages the wanted version holds the broker and its Erlang; the test bed runs it there
# (chroot, jobtide_testbed.rabbitmq) and the chart's test image is that same root.
# Each root lands in $JOBTIDE_CACHE/rabbitmq-<suite>-<version>/root and is built once.

# broker_root_dir SUITE VERSION -> the folder that holds that root
broker_root_dir() { printf '%s/rabbitmq-%s-%s' "$JOBTIDE_CACHE" "$1" "$2"; }

# debian_mirror: the mirror apt uses on this machine (deb822 sources or a one-line list).
debian_mirror() {
  local uri
  uri=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources \
    2>/dev/null | grep -v security | head -n1)
  [ -n "$uri" ] || uri=$(sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\).*/\2/p' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | grep -v security | head -n1)
  [ -n "$uri" ] || { echo "setup: no Debian mirror in apt's sources" >&2; return 1; }
  printf '%s' "$uri"
}

# in_root ROOT COMMAND...: COMMAND chrooted into ROOT with /proc, in a mount namespace of its
# own, so the mount goes away with the command.
in_root() {
  local root=$1
  shift
  unshare --mount --propagation private -- sh -c \
    'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"' "$root" "$@"
}

# build_broker_root SUITE VERSION: Debian SUITE's minbase with rabbitmq-server VERSION
# (exactly: a release whose archive moved on fails here, naming the version it has now).
build_broker_root() {
  local suite=$1 version=$2 dir tmp t0=$SECONDS have
  dir=$(broker_root_dir "$suite" "$version")
  [ -f "$dir/.done" ] && return 0
  echo "setup: building RabbitMQ $version from Debian $suite"
  tmp="$dir.partial"
  rm -rf "$tmp" "$dir"
  mkdir -p "$tmp"
  # bookworm's debootstrap has no script for releases newer than trixie; sid's fits them all.
  debootstrap --variant=minbase "$suite" "$tmp/root" "$(debian_mirror)" \
    /usr/share/debootstrap/scripts/sid >"$tmp/debootstrap.log" 2>&1 \
    || { tail -n 30 "$tmp/debootstrap.log" >&2; return 1; }
  cp /etc/resolv.conf "$tmp/root/etc/resolv.conf"
  # The broker's node name is name@localhost.
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$tmp/root/etc/hosts"
  # The mirror's testing release can be older than its Release file's short Valid-Until
  # (a week): apt then refuses it. Only the expiry is waived; signatures are still checked.
  # uid/gid 999, the official image's rabbitmq user, which the chart runs as: created before
  # the package would pick a free system id of its own. policy-rc.d: no service starts.
  printf '#!/bin/sh\nexit 101\n' >"$tmp/root/usr/sbin/policy-rc.d"
  chmod 755 "$tmp/root/usr/sbin/policy-rc.d"
  in_root "$tmp/root" sh -c "
    groupadd --system --gid 999 rabbitmq &&
    useradd --system --uid 999 --gid 999 --home-dir /var/lib/rabbitmq --no-create-home \
      --shell /usr/sbin/nologin rabbitmq &&
    apt-get -o Acquire::Check-Valid-Until=false update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      'rabbitmq-server=$version-*'" >"$tmp/apt.log" 2>&1 || {
    tail -n 30 "$tmp/apt.log" >&2
    have=$(in_root "$tmp/root" apt-cache policy rabbitmq-server 2>/dev/null | sed -n 's/ *Candidate: //p')
    echo "setup: rabbitmq-server $version not in Debian $suite (it has ${have:-none}):" \
      "update ci/versions" >&2
    return 1
  }
  rm -f "$tmp/root/usr/sbin/policy-rc.d" "$tmp/root/etc/resolv.conf"
  rm -rf "$tmp/root"/var/lib/apt/lists/* "$tmp/root"/var/cache/apt/archives/*.deb \
    "$tmp/root"/var/lib/rabbitmq/* "$tmp/root"/var/log/rabbitmq/*
  # Where the test bed binds a node's own folder (data, logs, config) into the root.
  mkdir -p "$tmp/root/srv/node"
  mv "$tmp" "$dir"
  touch "$dir/.done"
  echo "setup: built RabbitMQ $version (Debian $suite) in $((SECONDS - t0)) s"
}
