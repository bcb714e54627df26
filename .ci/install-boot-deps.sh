#!/usr/bin/env bash
# Installs the Debian packages the project's boot tests need. Idempotent: when
# everything is already there it changes nothing, runs no `apt-get update` and
# finishes in well under a second. Runs as root (CI and the dev machines are).
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

log() { printf 'install-boot-deps: %s\n' "$*" >&2; }

is_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

# True when apt's lists know every named package (before the first
# `apt-get update` on a fresh machine they may know nothing).
# One apt-cache call for all (each call costs ~1 s here: no pkgcache.bin), and
# it exits 0 even for unknown names, so count what it found.
apt_knows() {
    local found
    found="$(apt-cache show --no-all-versions "$@" 2>/dev/null | grep -c '^Package: ' || true)"
    [ "$found" -ge "$#" ]
}

apt_update_once_done=0
apt_update_once() {
    if [ "$apt_update_once_done" = 0 ]; then
        log "apt-get update"
        apt-get update -qq >/dev/null
        apt_update_once_done=1
    fi
}

# ---------------------------------------------------------------------------
# Section: boot-disk fixture (fixtures/boot-disk): SYSLINUX, mtools, FAT tools,
# sfdisk, cpio and qemu; ovmf (UEFI firmware, /usr/share/OVMF/OVMF_CODE.fd) so
# failovers of generation-2 VMs write a qemu.sh (the README's walk-through has one). The Debian kernel and busybox-static are NOT installed:
# fixtures/boot-disk/make-boot-disk.sh fetches them with `apt-get download` and
# unpacks them into its own cache, so this section only makes sure apt's lists
# can name them.
# ---------------------------------------------------------------------------
install_boot_disk_deps() {
    # iproute2, dnsmasq-base, nftables and iputils-ping: `drvault network up` (bridges, DHCP
    # with the failovers' reservations, isolation of drill networks) and the network boot
    # test (tests/it/failover_network.rs), which pings the guests from their gateway.
    local plain=(syslinux syslinux-common mtools dosfstools fdisk cpio libvirt-clients libxml2-utils ovmf
        iproute2 dnsmasq-base nftables iputils-ping)
    # qemu-system-* must be the same release as the installed qemu-utils:
    # qemu-utils >= 8 Breaks qemu-system-common < 8, so installing Debian 12's
    # qemu-system-x86 (7.2) next to the machine image's qemu-utils from
    # bookworm-backports (10.0) would make apt REMOVE qemu-utils.
    local qemu_utils_ver qemu_from_bpo=0
    qemu_utils_ver="$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)"
    if [ -n "$qemu_utils_ver" ] && dpkg --compare-versions "$qemu_utils_ver" ge 1:8; then
        qemu_from_bpo=1
    fi

    local missing=() p
    for p in "${plain[@]}" qemu-system-x86 qemu-utils; do
        is_installed "$p" || missing+=("$p")
    done

    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing: ${missing[*]}"
        local main_missing=() qemu_missing=0
        for p in "${missing[@]}"; do
            case "$p" in
                qemu-system-x86) qemu_missing=1 ;;
                *) main_missing+=("$p") ;;
            esac
        done
        if [ "$qemu_missing" = 1 ] && [ "$qemu_from_bpo" = 0 ]; then
            main_missing+=(qemu-system-x86)
        fi
        if [ "${#main_missing[@]}" -gt 0 ]; then
            apt_knows "${main_missing[@]}" || apt_update_once
            # --no-remove: never let apt "solve" a conflict by removing a tool
            # someone else relies on; fail loudly instead.
            apt-get install -y -qq --no-install-recommends --no-remove \
                "${main_missing[@]}" >/dev/null
        fi
        if [ "$qemu_missing" = 1 ] && [ "$qemu_from_bpo" = 1 ]; then
            install_qemu_system_from_backports
        fi
    fi

    # The kernel and busybox are downloaded later by make-boot-disk.sh.
    if ! apt_knows linux-image-amd64 busybox-static; then
        apt_update_once
        apt_knows linux-image-amd64 busybox-static || {
            log "apt does not know linux-image-amd64 / busybox-static even after apt-get update"
            return 1
        }
    fi
}

# Installs qemu-system-x86 (and the -common, -data and seabios it needs at the
# same release) from the backports suite of the distribution's own archive,
# using a private apt list directory and an extra sources file that exist only
# for this call: the machine's apt configuration is left as it was (this is the
# same way the machine image installed its qemu-utils).
install_qemu_system_from_backports() (
    local codename site tmp
    codename="$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")"
    [ -n "$codename" ] || { log "cannot tell the Debian codename from /etc/os-release"; return 1; }
    # The archive's address is taken from the machine's own sources, not
    # hard-coded here. ($(SITE) is apt's template, not shell.)
    # shellcheck disable=SC2016
    site="$(apt-get indextargets --format '$(SITE)' "Release: $codename" \
        "Identifier: Packages" 2>/dev/null | head -n 1)"
    if [ -z "$site" ]; then
        apt_update_once
        # shellcheck disable=SC2016
        site="$(apt-get indextargets --format '$(SITE)' "Release: $codename" \
            "Identifier: Packages" 2>/dev/null | head -n 1)"
    fi
    [ -n "$site" ] || { log "no apt source for suite '$codename' found"; return 1; }

    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp/lists/partial"
    printf 'deb %s %s-backports main\n' "$site" "$codename" >"$tmp/sources.list"
    # Seed with the machine's lists so the update only revalidates them.
    cp -p /var/lib/apt/lists/*_InRelease /var/lib/apt/lists/*_Packages* "$tmp/lists/" 2>/dev/null || true
    # Sandbox user root: the private directory is not readable by _apt.
    local opts=(-o "Dir::Etc::sourcelist=$tmp/sources.list" -o "Dir::State::lists=$tmp/lists"
        -o APT::Sandbox::User=root)
    log "qemu-utils is $(dpkg-query -W -f='${Version}' qemu-utils): taking qemu-system-x86 from $codename-backports"
    apt-get "${opts[@]}" update -qq >/dev/null
    local bpo="$codename-backports"
    apt-get "${opts[@]}" install -y -qq --no-install-recommends --no-remove \
        "qemu-system-x86/$bpo" "qemu-system-common/$bpo" "qemu-system-data/$bpo" \
        "seabios/$bpo" >/dev/null
)

install_boot_disk_deps
