#!/usr/bin/env bash
# Emulated cluster on one Linux machine: one network namespace per node, one
# veth link per NIC, each NIC index its own L2 "rail" (a bridge in a hub
# namespace), with optional rate limit, delay and loss per node link.
#
#   netns.sh up     [--prefix P] [--nodes N] [--nics K|K0,K1,..] [--link RATE] [--delay D]
#                   [--loss L] [--burst B] [--mtu M] [--fabric flat|rails] [--loose]
#   netns.sh down   [--prefix P]
#   netns.sh exec   [--prefix P] NODE cmd...
#   netns.sh link   [--prefix P] NODE NIC up|down
#   netns.sh impair [--prefix P] NODE NIC [--link RATE|none] [--delay D] [--loss L] [--burst B]
#   netns.sh check  [--prefix P]        ping every pair of nodes on every rail
#   netns.sh status [--prefix P]
#
# Layout (prefix P, default "sc"):
#   namespaces  P-n0 .. P-n<N-1> (nodes) and P-hub (the switch)
#   node I, NIC K: interface "nicK" in P-nI, address 10.77.K.(I+1); its peer
#   "nIkK" in P-hub is a switch port. --nics 4,2 gives node 0 four NICs and
#   node 1 two (the last count repeats for further nodes).
#   --fabric flat (default): one bridge "fabric", one subnet 10.77.0.0/16: any
#     NIC reaches any NIC, as on a real cluster's fabric. Each node has a rule
#     "from 10.77.K.(I+1) lookup table 100+K" routing the fabric out of nicK,
#     and answers ARP for an address only on its own NIC (arp_ignore=1,
#     arp_announce=2): a socket bound to NIC K's address (libfabric's tcp
#     provider binds its data sockets to the domain's address) leaves through
#     nicK, and traffic for it arrives through nicK.
#   --fabric rails: bridge "railK" per NIC index, subnet 10.77.K.0/24: NIC K
#     reaches only NIC K of other nodes (rail-optimised). Unless --loose, the
#     policy table of NIC K only reaches rail K, so a cross-rail connect fails
#     (unreachable) instead of leaving through another NIC.
#
# Impairments are per node link, and one-way, like a switch port toward the node:
#   --link RATE  tbf on both ends of the link (node egress and hub egress), so
#                both directions are capped (tc rate units: 1gbit, 400mbit ...)
#   --loss L     percent, of packets delivered TO the node (tc cBPF filter on
#                the node's ingress, random drop). With --link the hub's tbf
#                splits GSO packets into MTU frames first (burst 32k by default
#                when loss is set), so loss is per frame; without --link a drop
#                takes a whole GSO packet (up to 64 KiB).
#   --delay D    one-way delay of packets delivered TO the node (us, ms, s).
#                This kernel has no sch_netem, so it is an iptables NFQUEUE rule
#                in the node's PREROUTING plus nfq_delay.py (same folder) holding
#                each packet D. Needs python3 and iptables (apt-get install
#                iptables). Delay at the receiver, not the sender: a packet held
#                at the sender stays charged to its socket (TCP small queues)
#                and throughput collapses.
#   RTT between nodes A and B on a rail = delay(A) + delay(B).
#
# Only namespaces named P-n<i> / P-hub and the links inside them are touched;
# veth pairs are created directly inside those namespaces, never in the host's.
# `down` kills the processes still inside them (by pid), then deletes them; it
# is idempotent and works after a killed `up`.
set -euo pipefail

SELF_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NFQ_DELAY="$SELF_DIR/nfq_delay.py"
STATE_ROOT=/run/strait-netns
PREFIX=${STRAIT_NETNS_PREFIX:-sc}

die() { echo "netns.sh: $*" >&2; exit 1; }
log() { echo "netns.sh: $*" >&2; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (it creates network namespaces, veth links and qdiscs); try: sudo $0 ..."
    command -v ip >/dev/null || die "needs iproute2 (ip)"
    command -v tc >/dev/null || die "needs iproute2 (tc)"
}

check_prefix() {
    [[ $PREFIX =~ ^[A-Za-z0-9_.]{1,24}$ ]] || die "bad --prefix '$PREFIX' (letters, digits, _ and ., at most 24)"
}

node_ns() { echo "$PREFIX-n$1"; }
hub_ns() { echo "$PREFIX-hub"; }
state_dir() { echo "$STATE_ROOT/$PREFIX"; }

# Namespaces of this prefix, existing now.
our_namespaces() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX//./\\.}-(n[0-9]+|hub)\$" || true
}

ns_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx -- "$1"; }

# NODE may be "3" or "n3".
parse_node() {
    local n=${1#n}
    [[ $n =~ ^[0-9]+$ ]] || die "bad node '$1' (an index, e.g. 0 or n0)"
    ns_exists "$(node_ns "$n")" || die "no node $n (namespace $(node_ns "$n") missing; run up first)"
    echo "$n"
}

parse_nic() {
    local k=${1#nic}
    [[ $k =~ ^[0-9]+$ ]] || die "bad NIC '$1' (an index, e.g. 0 or nic0)"
    ip -n "$(node_ns "$2")" link show "nic$k" >/dev/null 2>&1 || die "node $2 has no nic$k"
    echo "$k"
}

# "5ms" "500us" "1.5ms" "0" "2s" "3" (ms) -> microseconds
delay_us() {
    local d=$1
    [[ $d =~ ^([0-9]+(\.[0-9]+)?)(us|ms|s)?$ ]] || die "bad delay '$d' (e.g. 500us, 2ms)"
    awk -v v="${BASH_REMATCH[1]}" -v u="${BASH_REMATCH[3]:-ms}" \
        'BEGIN { m = (u == "us") ? 1 : (u == "ms") ? 1000 : 1000000; printf "%.0f\n", v * m }'
}

# "1%" "0.5" (percent) -> 32-bit threshold for the cBPF random draw
loss_threshold() {
    local l=${1%\%}
    [[ $l =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "bad loss '$1' (percent, e.g. 1% or 0.1)"
    awk -v p="$l" 'BEGIN { if (p > 100) p = 100; printf "%.0f\n", p / 100 * 4294967295 }'
}

# --- per-link impairments -----------------------------------------------

set_rate() {  # node nic rate burst
    local i=$1 k=$2 rate=$3 burst=$4
    local dev ns side
    for side in node hub; do
        if [[ $side == node ]]; then ns=$(node_ns "$i"); dev=nic$k; else ns=$(hub_ns); dev=n${i}k$k; fi
        if [[ -z $rate || $rate == none ]]; then
            ip netns exec "$ns" tc qdisc del dev "$dev" root 2>/dev/null || true
            rm -f "$(state_dir)/rate-n$i-nic$k"
        else
            ip netns exec "$ns" tc qdisc replace dev "$dev" root tbf rate "$rate" burst "$burst" latency "${QUEUE:-5ms}"
            echo "$rate" >"$(state_dir)/rate-n$i-nic$k"
        fi
    done
}

set_loss() {  # node nic loss
    local ns dev=nic$2 t
    ns=$(node_ns "$1")
    ip netns exec "$ns" tc qdisc del dev "$dev" clsact 2>/dev/null || true
    [[ -z $3 ]] && return 0
    t=$(loss_threshold "$3")
    [[ $t == 0 ]] && return 0
    ip netns exec "$ns" tc qdisc add dev "$dev" clsact
    # A = random u32; A >= t: TC_ACT_OK (0), else TC_ACT_SHOT (2)
    ip netns exec "$ns" tc filter add dev "$dev" ingress bpf da \
        bytecode "4,32 0 0 4294963256,53 0 1 $t,6 0 0 0,6 0 0 2"
}

stop_delay() {  # node nic
    local ns pidf pid
    ns=$(node_ns "$1")
    pidf="$(state_dir)/delay-n$1-nic$2.pid"
    if [[ -f $pidf ]]; then
        pid=$(cat "$pidf")
        # only a process that is still inside our namespace
        if [[ -n $pid ]] && ip netns identify "$pid" 2>/dev/null | grep -qx -- "$ns"; then
            kill "$pid" 2>/dev/null || true
        fi
        rm -f "$pidf"
    fi
    if command -v iptables >/dev/null; then
        while ip netns exec "$ns" iptables -t mangle -D PREROUTING -i "nic$2" -j NFQUEUE \
            --queue-num "$2" --queue-bypass 2>/dev/null; do :; done
    fi
}

set_delay() {  # node nic delay
    local i=$1 k=$2 us ns pid
    stop_delay "$i" "$k"
    [[ -z $3 ]] && return 0
    us=$(delay_us "$3")
    [[ $us == 0 ]] && return 0
    command -v iptables >/dev/null || die "--delay needs iptables (apt-get install iptables): this kernel has no sch_netem"
    command -v python3 >/dev/null || die "--delay needs python3"
    ns=$(node_ns "$i")
    mkdir -p "$(state_dir)"
    setsid ip netns exec "$ns" python3 "$NFQ_DELAY" --queue "$k" --delay-us "$us" \
        >"$(state_dir)/delay-n$i-nic$k.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$(state_dir)/delay-n$i-nic$k.pid"
    sleep 0.3
    kill -0 "$pid" 2>/dev/null || die "delay daemon for node $i nic$k died: $(cat "$(state_dir)/delay-n$i-nic$k.log")"
    ip netns exec "$ns" iptables -t mangle -A PREROUTING -i "nic$k" -j NFQUEUE --queue-num "$k" --queue-bypass
}

# --- subcommands ------------------------------------------------------------

cmd_down() {
    need_root
    check_prefix
    local ns pids
    for ns in $(our_namespaces); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        if [[ -n $pids ]]; then
            # shellcheck disable=SC2086
            kill $pids 2>/dev/null || true
            for _ in 1 2 3 4 5 6 7 8 9 10; do
                pids=$(ip netns pids "$ns" 2>/dev/null || true)
                [[ -z $pids ]] && break
                sleep 0.2
            done
            # shellcheck disable=SC2086
            [[ -n $pids ]] && kill -9 $pids 2>/dev/null || true
        fi
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$(state_dir)"
    [[ -z $(our_namespaces) ]] || die "namespaces left: $(our_namespaces | tr '\n' ' ')"
    log "prefix $PREFIX: down"
}

cmd_up() {
    local nodes=2 nics=1 rate="" delay="" loss="" burst="" mtu=1500 loose=0 fabric=flat
    while [[ $# -gt 0 ]]; do
        case $1 in
            --nodes) nodes=$2; shift 2 ;;
            --nics) nics=$2; shift 2 ;;
            --link) rate=$2; shift 2 ;;
            --delay) delay=$2; shift 2 ;;
            --loss) loss=$2; shift 2 ;;
            --burst) burst=$2; shift 2 ;;
            --mtu) mtu=$2; shift 2 ;;
            --loose) loose=1; shift ;;
            --fabric) fabric=$2; shift 2 ;;
            --prefix) PREFIX=$2; shift 2 ;;
            *) die "up: unknown option '$1'" ;;
        esac
    done
    need_root
    check_prefix
    [[ $nodes =~ ^[0-9]+$ && $nodes -ge 2 && $nodes -le 253 ]] || die "--nodes: 2..253"
    [[ $nics =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--nics: a count (1..16) or one per node, comma-separated"
    local -a per_node
    IFS=, read -r -a per_node <<<"$nics"
    for k in "${per_node[@]}"; do [[ $k -ge 1 && $k -le 16 ]] || die "--nics: 1..16 per node"; done
    [[ $fabric == flat || $fabric == rails ]] || die "--fabric: flat or rails"
    [[ -n $delay ]] && delay_us "$delay" >/dev/null
    [[ -n $loss ]] && loss_threshold "$loss" >/dev/null
    [[ -z $(our_namespaces) ]] || die "prefix $PREFIX already up ($(our_namespaces | tr '\n' ' ')); run: $0 down --prefix $PREFIX"
    if [[ -z $burst ]]; then
        if [[ -n $loss && $(loss_threshold "$loss") != 0 ]]; then burst=32k; else burst=256k; fi
    fi
    mkdir -p "$(state_dir)"
    # a failed or interrupted up leaves nothing behind
    trap 'rc=$?; if [[ $rc != 0 ]]; then log "up failed (rc $rc): removing prefix $PREFIX"; cmd_down || true; fi' EXIT
    trap 'exit 130' INT TERM
    echo "nodes=$nodes nics=$nics fabric=$fabric rate=$rate delay=$delay loss=$loss burst=$burst mtu=$mtu" >"$(state_dir)/config"

    local hub i k ns addr n most=0
    for k in "${per_node[@]}"; do [[ $k -gt $most ]] && most=$k; done
    hub=$(hub_ns)
    ip netns add "$hub"
    ip netns exec "$hub" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    ip -n "$hub" link set lo up
    if [[ $fabric == flat ]]; then
        ip -n "$hub" link add fabric type bridge forward_delay 0 stp_state 0
        ip -n "$hub" link set fabric mtu "$mtu" up
    else
        for ((k = 0; k < most; k++)); do
            ip -n "$hub" link add "rail$k" type bridge forward_delay 0 stp_state 0
            ip -n "$hub" link set "rail$k" mtu "$mtu" up
        done
    fi
    for ((i = 0; i < nodes; i++)); do
        ns=$(node_ns "$i")
        n=${per_node[$((i < ${#per_node[@]} ? i : ${#per_node[@]} - 1))]}
        ip netns add "$ns"
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 \
            net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
            net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
        ip -n "$ns" link set lo up
        for ((k = 0; k < n; k++)); do
            addr=10.77.$k.$((i + 1))
            # both ends created directly inside their namespaces
            ip link add "nic$k" netns "$ns" mtu "$mtu" type veth peer name "n${i}k$k" netns "$hub" mtu "$mtu"
            if [[ $fabric == flat ]]; then
                ip -n "$hub" link set "n${i}k$k" master fabric up
                ip -n "$ns" addr add "$addr/16" dev "nic$k"
                ip -n "$ns" link set "nic$k" up
                ip -n "$ns" route add 10.77.0.0/16 dev "nic$k" src "$addr" table $((100 + k))
                ip -n "$ns" rule add from "$addr" lookup $((100 + k)) pref $((1000 + k))
            else
                ip -n "$hub" link set "n${i}k$k" master "rail$k" up
                ip -n "$ns" addr add "$addr/24" dev "nic$k"
                ip -n "$ns" link set "nic$k" up
                if [[ $loose == 0 ]]; then
                    ip -n "$ns" route add "10.77.$k.0/24" dev "nic$k" src "$addr" table $((100 + k))
                    ip -n "$ns" route add unreachable 10.77.0.0/16 table $((100 + k))
                    ip -n "$ns" rule add from "$addr" lookup $((100 + k)) pref $((1000 + k))
                fi
            fi
            set_rate "$i" "$k" "$rate" "$burst"
            set_loss "$i" "$k" "$loss"
            set_delay "$i" "$k" "$delay"
        done
    done
    trap - EXIT INT TERM
    log "prefix $PREFIX up: $nodes nodes, NICs $nics, $fabric fabric; node I NIC K = nicK in $(node_ns I), 10.77.K.(I+1)"
    log "run: $0 exec --prefix $PREFIX 0 CMD...   (namespace $(node_ns 0))"
}

cmd_exec() {
    [[ ${1:-} == --prefix ]] && { PREFIX=$2; shift 2; }
    need_root
    check_prefix
    [[ $# -ge 2 ]] || die "usage: exec [--prefix P] NODE cmd..."
    local i
    i=$(parse_node "$1")
    shift
    exec ip netns exec "$(node_ns "$i")" "$@"
}

cmd_link() {
    [[ ${1:-} == --prefix ]] && { PREFIX=$2; shift 2; }
    need_root
    check_prefix
    [[ $# -eq 3 && ($3 == up || $3 == down) ]] || die "usage: link [--prefix P] NODE NIC up|down"
    local i k
    i=$(parse_node "$1")
    k=$(parse_nic "$2" "$i")
    # the switch port: the node's nicK loses carrier, keeps its address and routes
    ip -n "$(hub_ns)" link set "n${i}k$k" "$3"
    log "node $i nic$k: $3 (hub port n${i}k$k)"
}

cmd_impair() {
    [[ ${1:-} == --prefix ]] && { PREFIX=$2; shift 2; }
    need_root
    check_prefix
    [[ $# -ge 2 ]] || die "usage: impair [--prefix P] NODE NIC [--link RATE|none] [--delay D] [--loss L] [--burst B]"
    local i k rate="-" delay="-" loss="-" burst=""
    i=$(parse_node "$1")
    k=$(parse_nic "$2" "$i")
    shift 2
    while [[ $# -gt 0 ]]; do
        case $1 in
            --link) rate=$2; shift 2 ;;
            --delay) delay=$2; shift 2 ;;
            --loss) loss=$2; shift 2 ;;
            --burst) burst=$2; shift 2 ;;
            --prefix) PREFIX=$2; shift 2 ;;
            *) die "impair: unknown option '$1'" ;;
        esac
    done
    if [[ $loss != - ]]; then set_loss "$i" "$k" "$loss"; fi
    if [[ $delay != - ]]; then set_delay "$i" "$k" "$delay"; fi
    if [[ $rate != - || $loss != - ]]; then
        local cur
        cur=$(cat "$(state_dir)/rate-n$i-nic$k" 2>/dev/null || true)
        [[ $rate == - ]] && rate=$cur
        if [[ -z $burst ]]; then
            # tbf burst below the 64 KiB GSO size: the hub splits GSO packets, loss is per frame
            if ip netns exec "$(node_ns "$i")" tc filter show dev "nic$k" ingress 2>/dev/null | grep -q bytecode; then
                burst=32k
            else
                burst=256k
            fi
        fi
        set_rate "$i" "$k" "$rate" "$burst"
    fi
    log "node $i nic$k: link=$rate delay=$delay loss=$loss (- = unchanged)"
}

cmd_check() {
    [[ ${1:-} == --prefix ]] && { PREFIX=$2; shift 2; }
    need_root
    check_prefix
    command -v python3 >/dev/null || die "check needs python3"
    local nodes nics=0 i j k fail=0
    nodes=$(our_namespaces | grep -c -- '-n[0-9]*$' || true)
    [[ $nodes -ge 2 ]] || die "prefix $PREFIX is not up"
    local -a count
    for ((i = 0; i < nodes; i++)); do
        count[i]=$(ip -n "$(node_ns "$i")" -o link show | grep -c ' nic[0-9]*@' || true)
        nics=$((count[i] > ${nics:-0} ? count[i] : ${nics:-0}))
    done
    for ((k = 0; k < nics; k++)); do
        for ((i = 0; i < nodes; i++)); do
            for ((j = 0; j < nodes; j++)); do
                [[ $i == "$j" || $k -ge ${count[i]} || $k -ge ${count[j]} ]] && continue
                ip netns exec "$(node_ns "$i")" python3 - "10.77.$k.$((i + 1))" "10.77.$k.$((j + 1))" <<'EOF' || fail=1
import os, socket, struct, sys, time
src, dst = sys.argv[1], sys.argv[2]
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.bind((src, 0)); s.settimeout(1.0)
ident, rtts = os.getpid() & 0xFFFF, []
for seq in range(3):
    body = struct.pack("!HH", ident, seq) + b"x" * 56
    pkt = struct.pack("!BBH", 8, 0, csum(b"\x08\x00\x00\x00" + body)) + body
    t = time.monotonic(); s.sendto(pkt, (dst, 0))
    try:
        while True:
            d, _ = s.recvfrom(2048); h = (d[0] & 15) * 4
            if d[h] == 0 and struct.unpack_from("!HH", d, h + 4) == (ident, seq):
                rtts.append((time.monotonic() - t) * 1e3); break
    except socket.timeout:
        pass
ok = bool(rtts)
print("  %s -> %s: %d/3%s" % (src, dst, len(rtts), ", rtt avg %.3f ms" % (sum(rtts) / len(rtts)) if ok else "  FAIL"))
sys.exit(0 if ok else 1)
EOF
            done
        done
    done
    [[ $fail == 0 ]] || die "check: some pings failed"
    log "check: all rails reachable"
}

cmd_status() {
    [[ ${1:-} == --prefix ]] && { PREFIX=$2; shift 2; }
    check_prefix
    local ns
    [[ -f $(state_dir)/config ]] && echo "config: $(cat "$(state_dir)/config")"
    for ns in $(our_namespaces); do
        echo "== $ns"
        ip -n "$ns" -br addr show | grep -v '^lo ' || true
        ip netns exec "$ns" tc qdisc show | grep -v -E 'noqueue|^qdisc (pfifo_fast|mq) ' | sed 's/^/  /' || true
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        [[ -n $pids ]] && echo "  processes: $pids"
    done
}

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

main() {
    local cmd=${1:-}
    [[ $# -gt 0 ]] && shift
    case $cmd in
        up) cmd_up "$@" ;;
        down)
            [[ ${1:-} == --prefix ]] && PREFIX=$2
            cmd_down ;;
        exec) cmd_exec "$@" ;;
        link) cmd_link "$@" ;;
        impair) cmd_impair "$@" ;;
        check) cmd_check "$@" ;;
        status) cmd_status "$@" ;;
        -h | --help | help | "") usage ;;
        *) usage >&2; die "unknown subcommand '$cmd'" ;;
    esac
}

main "$@"
