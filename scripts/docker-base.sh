#!/usr/bin/env bash
# A local base image for docker/Dockerfile where no registry can be pulled from: a minimal Debian
# (as debian:<suite>-slim: no python, so the Dockerfile installs Debian's, the way it does on the
# CUDA image's Ubuntu base) from the mirror apt already uses (debootstrap), imported into Docker.
# Prints the image's name on stdout (all else goes to stderr):
#   docker build -f docker/Dockerfile --build-arg BASE_IMAGE="$(bash scripts/docker-base.sh)" .
# Needs root. Installs docker.io and debootstrap with apt if missing and starts dockerd if none
# answers. The root filesystem is cached as a tarball in ~/.cache/engram-serve/docker-base/ (never
# in the repository), so a rerun, or a fresh Docker engine, only imports it (seconds).
set -euo pipefail
log() { echo "docker-base: $*" >&2; }

suite=$(. /etc/os-release && echo "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}")
# the first Debian (not security) mirror of apt's sources, deb822 or one-line format
mirror=$( { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
            grep -hs '^deb ' /etc/apt/sources.list | grep -o 'https\?://[^ ]*'; } | grep -v security | head -n1 || true)
mirror=${mirror:-http://deb.debian.org/debian}
packages=ca-certificates
key=$(echo "$suite $mirror $packages" | sha1sum | cut -c1-8)
tag=engram-serve-base:$suite-$key
cache=${XDG_CACHE_HOME:-$HOME/.cache}/engram-serve/docker-base
tarball=$cache/$suite-$key.tar

need() {  # need COMMAND PACKAGE: apt-get install PACKAGE unless COMMAND exists
    command -v "$1" >/dev/null && return
    log "installing $2"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >&2
}

need dockerd docker.io
if ! docker info >/dev/null 2>&1; then
    mkdir -p "$cache"
    log "starting dockerd (log: $cache/dockerd.log)"
    nohup dockerd >"$cache/dockerd.log" 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { log "dockerd did not start, see $cache/dockerd.log"; exit 1; }
fi

# This machine's own certificate authorities (a TLS-intercepting egress proxy's, say) go into the
# image too, so pip inside a build trusts what pip here trusts; they are not cached (they change).
certs=(/usr/local/share/ca-certificates/*.crt)
[[ -e ${certs[0]} ]] || certs=()
final=$tag
((${#certs[@]})) && final=$tag-ca$(cat "${certs[@]}" | sha1sum | cut -c1-8)
if docker image inspect "$final" >/dev/null 2>&1; then echo "$final"; exit 0; fi

if ! docker image inspect "$tag" >/dev/null 2>&1; then
    if [[ ! -f $tarball ]]; then
        need debootstrap debootstrap
        mkdir -p "$cache"
        rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
        trap 'rm -rf "$rootfs"' EXIT
        log "debootstrap $suite from $mirror with $packages (a few minutes, once)"
        debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >&2
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar --numeric-owner -C "$rootfs" -cf "$tarball.partial" . && mv "$tarball.partial" "$tarball"
    fi
    log "docker import $tarball as $tag"
    # as Debian's own images: a PATH (a Dockerfile's `ENV PATH=...:$PATH` extends it) and a shell
    docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' "$tarball" "$tag" >&2
fi

if ((${#certs[@]})); then
    log "adding this machine's CAs (${certs[*]}) as $final"
    dir=$(mktemp -d)
    cp "${certs[@]}" "$dir/"
    printf '%s\n' "FROM $tag" 'COPY *.crt /usr/local/share/ca-certificates/' 'RUN update-ca-certificates' \
        'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        >"$dir/Dockerfile"
    docker build -q -t "$final" "$dir" >&2
    rm -rf "$dir"
fi
echo "$final"
