//! Which NICs serve which GPU: PCIe topology from sysfs.
//!
//! On an 8-GPU node with 8 to 32 RDMA NICs, a GPU's transfers should go
//! through the NICs nearest to it: behind the same PCIe switch (the bytes
//! then never cross the CPU's root complex), else on the same NUMA node.
//! [`Topology::from_sysfs`] reads that from a sysfs tree (the machine's,
//! `/sys`, or a synthetic one in tests), as a pure function of the files:
//!
//! * GPUs: PCI functions of vendor `0x10de` (NVIDIA) and class `0x03xxxx`
//!   (display controllers: this leaves out NVSwitches, class `0x0680`),
//!   numbered in PCI address order. That is CUDA's order with
//!   `CUDA_DEVICE_ORDER=PCI_BUS_ID`, and nvidia-smi's; on a node of
//!   identical GPUs it is also CUDA's default order, which breaks ties
//!   between equally fast devices by PCI bus id.
//! * RDMA NICs: the entries of `class/infiniband` (EFA's `rdmapXsY`,
//!   ConnectX's `mlx5_N`), each with the PCI function its `device` link
//!   points at.
//! * Where each sits: the chain of PCI functions from its root complex
//!   (`pci0000:00`) down to it, which is the path sysfs resolves the
//!   device's `bus/pci/devices/<address>` link to; and its `numa_node`.
//!
//! [`Topology::nics_for_gpu`] then takes the NICs sharing the deepest
//! ancestor with the GPU below the root complex (a switch, or a root port);
//! when several GPUs share that ancestor with the same NICs (a p5en
//! switch carries two GPUs and four EFA devices), the NICs are divided
//! among them in order, so that GPUs do not share NICs unless there are
//! fewer NICs than GPUs. Without such an ancestor, the NICs of the GPU's
//! NUMA node are taken, else every NIC. Perplexity's fabric-lib
//! (`detect_topology`) and Mooncake's NIC matrix make the same choice.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// NVIDIA's PCI vendor id.
const NVIDIA: u32 = 0x10de;

/// One PCI function, as sysfs places it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciPlace {
    /// Its address, e.g. `0000:53:00.0`.
    pub address: String,
    /// Its root complex (`pci0000:50`) and the PCI functions from there
    /// down to it, itself last.
    pub path: Vec<String>,
    /// Its NUMA node, where the platform says.
    pub numa_node: Option<u32>,
}

impl PciPlace {
    /// How many leading components of the two paths are equal.
    fn common_depth(&self, other: &PciPlace) -> usize {
        self.path.iter().zip(&other.path).take_while(|(a, b)| a == b).count()
    }
}

/// A GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpu {
    /// Its number (PCI address order).
    pub index: usize,
    /// Where it sits.
    pub pci: PciPlace,
}

/// An RDMA NIC (an entry of `/sys/class/infiniband`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RdmaNic {
    /// Its device name (`mlx5_0`, `rdmap79s0`): what verbs opens, and what
    /// libfabric's efa names its domain after (`rdmap79s0-rdm`).
    pub name: String,
    /// Its PCI vendor (`0x1d0f` Amazon EFA, `0x15b3` NVIDIA/Mellanox).
    pub vendor: u32,
    /// Where it sits.
    pub pci: PciPlace,
}

impl RdmaNic {
    /// An AWS EFA device (vendor `0x1d0f`).
    pub fn is_efa(&self) -> bool {
        self.vendor == 0x1d0f
    }
}

/// How near the NICs [`Topology::nics_for_gpu`] picked are to the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Nearness {
    /// Any NIC of the machine: none shares a PCIe ancestor or NUMA node.
    Machine,
    /// Same NUMA node, different root complex.
    NumaNode,
    /// Same root complex, different switch.
    RootComplex,
    /// Behind the same PCIe switch (or root port).
    Switch,
}

/// The GPUs and RDMA NICs of a machine, and where they sit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// In index order.
    pub gpus: Vec<Gpu>,
    /// In name order.
    pub nics: Vec<RdmaNic>,
}

/// Why no topology could be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologyError(pub String);

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TopologyError {}

fn read_hex(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

fn read_numa(dir: &Path) -> Option<u32> {
    // -1: the platform does not say.
    std::fs::read_to_string(dir.join("numa_node")).ok()?.trim().parse::<i64>().ok().and_then(|n| u32::try_from(n).ok())
}

/// `devices/pci0000:50/0000:50:01.0/0000:51:00.0` under `root` ->
/// `["pci0000:50", "0000:50:01.0", "0000:51:00.0"]`: the components from
/// the root complex on, of the link's target resolved against `root`.
fn place(root: &Path, link: &Path) -> Option<PciPlace> {
    let target = std::fs::canonicalize(link).ok()?;
    let devices = std::fs::canonicalize(root.join("devices")).ok()?;
    let rest = target.strip_prefix(&devices).ok()?;
    let path: Vec<String> = rest.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    let first = path.iter().position(|c| c.starts_with("pci"))?;
    let path = path[first..].to_vec();
    let address = path.last()?.clone();
    Some(PciPlace { address, path, numa_node: read_numa(&target) })
}

impl Topology {
    /// This machine's topology (`/sys`).
    pub fn discover() -> Result<Topology, TopologyError> {
        Topology::from_sysfs(Path::new("/sys"))
    }

    /// The topology a sysfs tree at `root` describes: `root/bus/pci/devices`
    /// (links into `root/devices`) for the GPUs, `root/class/infiniband`
    /// for the RDMA NICs. A tree without `class/infiniband` has no RDMA
    /// NICs; one without `bus/pci/devices` is an error.
    pub fn from_sysfs(root: &Path) -> Result<Topology, TopologyError> {
        let pci = root.join("bus/pci/devices");
        let entries =
            std::fs::read_dir(&pci).map_err(|e| TopologyError(format!("cannot list {}: {e}", pci.display())))?;
        let mut gpus: Vec<PciPlace> = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            let (Some(vendor), Some(class)) = (read_hex(&dir.join("vendor")), read_hex(&dir.join("class"))) else {
                continue;
            };
            if vendor == NVIDIA && class >> 16 == 0x03 {
                if let Some(p) = place(root, &dir) {
                    gpus.push(p);
                }
            }
        }
        gpus.sort_by(|a, b| a.address.cmp(&b.address));
        let gpus = gpus.into_iter().enumerate().map(|(index, pci)| Gpu { index, pci }).collect();
        let mut nics = Vec::new();
        if let Ok(entries) = std::fs::read_dir(root.join("class/infiniband")) {
            for entry in entries.flatten() {
                let device: PathBuf = entry.path().join("device");
                let Some(pci) = place(root, &device) else { continue };
                let vendor = read_hex(&device.join("vendor")).unwrap_or(0);
                nics.push(RdmaNic { name: entry.file_name().to_string_lossy().into_owned(), vendor, pci });
            }
        }
        nics.sort_by(|a: &RdmaNic, b: &RdmaNic| a.name.cmp(&b.name));
        Ok(Topology { gpus, nics })
    }

    /// The NICs nearest to GPU `gpu` (see the module docs), in name order,
    /// and how near they are; `None` when there is no such GPU or no NIC.
    pub fn nics_for_gpu(&self, gpu: usize) -> Option<(Vec<&RdmaNic>, Nearness)> {
        self.nics_for_gpu_where(gpu, |_| true)
    }

    /// As [`nics_for_gpu`](Self::nics_for_gpu), among the NICs `keep`
    /// accepts (e.g. [`RdmaNic::is_efa`] for an EFA engine), at most
    /// [`MAX_NICS`](crate::MAX_NICS) of them. At every level the NICs are
    /// divided among the GPUs that level pairs with them: those behind the
    /// same switch, or, without one, of the same NUMA node, or of the
    /// machine.
    pub fn nics_for_gpu_where(&self, gpu: usize, keep: impl Fn(&RdmaNic) -> bool) -> Option<(Vec<&RdmaNic>, Nearness)> {
        let g = self.gpus.get(gpu)?;
        let nics: Vec<&RdmaNic> = self.nics.iter().filter(|n| keep(n)).collect();
        if nics.is_empty() {
            return None;
        }
        // Depth 1: the same root complex; 2: the same root port; more: a
        // switch below it.
        let best_of = |o: &Gpu| nics.iter().map(|n| o.pci.common_depth(&n.pci)).max().unwrap_or(0);
        let best = best_of(g);
        let (near, sharing, nearness): (Vec<&RdmaNic>, Vec<&Gpu>, Nearness) = if best >= 1 {
            let near = nics.iter().copied().filter(|n| g.pci.common_depth(&n.pci) == best).collect();
            // The GPUs for which the same ancestor is the nearest to NICs:
            // they share these NICs.
            let ancestor = &g.pci.path[..best];
            let sharing = self
                .gpus
                .iter()
                .filter(|o| o.pci.path.len() >= best && o.pci.path[..best] == *ancestor && best_of(o) == best)
                .collect();
            (near, sharing, if best >= 2 { Nearness::Switch } else { Nearness::RootComplex })
        } else {
            let node = g.pci.numa_node;
            let numa: Vec<&RdmaNic> =
                nics.iter().copied().filter(|n| node.is_some() && n.pci.numa_node == node).collect();
            // The GPUs left to the same fallback.
            let unplaced = |o: &&Gpu| best_of(o) == 0;
            if numa.is_empty() {
                let sharing = self
                    .gpus
                    .iter()
                    .filter(unplaced)
                    .filter(|o| !nics.iter().any(|n| o.pci.numa_node.is_some() && n.pci.numa_node == o.pci.numa_node))
                    .collect();
                (nics.clone(), sharing, Nearness::Machine)
            } else {
                let sharing = self.gpus.iter().filter(unplaced).filter(|o| o.pci.numa_node == node).collect();
                (numa, sharing, Nearness::NumaNode)
            }
        };
        let share = sharing.iter().position(|o| o.index == g.index).unwrap_or(0);
        let mut picked = divide(&near, sharing.len(), share);
        picked.truncate(crate::wire::MAX_NICS);
        Some((picked, nearness))
    }

    /// Every GPU's NICs, by GPU index: `(gpu, NIC names, nearness)`.
    pub fn gpu_nic_map(&self) -> BTreeMap<usize, (Vec<String>, Nearness)> {
        self.gpus
            .iter()
            .filter_map(|g| {
                let (nics, near) = self.nics_for_gpu(g.index)?;
                Some((g.index, (nics.iter().map(|n| n.name.clone()).collect(), near)))
            })
            .collect()
    }
}

/// Share `share` of `parts` equal shares of `nics` (in order); every share
/// gets at least one NIC, so with fewer NICs than parts some are shared.
fn divide<'a>(nics: &[&'a RdmaNic], parts: usize, share: usize) -> Vec<&'a RdmaNic> {
    let parts = parts.max(1);
    if nics.len() < parts {
        return vec![nics[share * nics.len() / parts]];
    }
    let (start, end) = (share * nics.len() / parts, (share + 1) * nics.len() / parts);
    nics[start..end].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic sysfs tree under a temporary directory.
    struct Tree {
        root: PathBuf,
    }

    impl Tree {
        fn new(name: &str) -> Tree {
            let root = std::env::temp_dir().join(format!("strait-sysfs-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join("bus/pci/devices")).unwrap();
            std::fs::create_dir_all(root.join("class/infiniband")).unwrap();
            Tree { root }
        }

        /// A PCI function at `path` (root complex first), with its files.
        fn function(&self, path: &[&str], vendor: u32, class: u32, numa: i32) {
            let dir = path.iter().fold(self.root.join("devices"), |d, c| d.join(c));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("vendor"), format!("0x{vendor:04x}\n")).unwrap();
            std::fs::write(dir.join("class"), format!("0x{class:06x}\n")).unwrap();
            std::fs::write(dir.join("numa_node"), format!("{numa}\n")).unwrap();
            let link = self.root.join("bus/pci/devices").join(path.last().unwrap());
            let _ = std::os::unix::fs::symlink(&dir, link);
        }

        fn rdma(&self, name: &str, path: &[&str], vendor: u32, numa: i32) {
            self.function(path, vendor, 0x020000, numa);
            let dir = self.root.join("class/infiniband").join(name);
            std::fs::create_dir_all(&dir).unwrap();
            let target = path.iter().fold(self.root.join("devices"), |d, c| d.join(c));
            std::os::unix::fs::symlink(target, dir.join("device")).unwrap();
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    /// A p5en-like node: 8 H200 and 16 EFA devices behind 4 PCIe switches
    /// (2 GPUs and 4 EFA each), 2 switches per NUMA node; plus NVSwitches
    /// and the instance's ENA, which are not RDMA NICs.
    fn p5en() -> Tree {
        let t = Tree::new("p5en");
        for s in 0..4u32 {
            let rc = format!("pci0000:{:02x}", 0x40 * s);
            let port = format!("0000:{:02x}:01.0", 0x40 * s);
            let up = format!("0000:{:02x}:00.0", 0x40 * s + 1);
            let numa = (s / 2) as i32;
            t.function(&[&rc, &port], 0x8086, 0x060400, numa);
            t.function(&[&rc, &port, &up], 0x1000, 0x060400, numa);
            for d in 0..6u32 {
                let down = format!("0000:{:02x}:{:02x}.0", 0x40 * s + 2, d);
                let leaf = format!("0000:{:02x}:00.0", 0x40 * s + 3 + d);
                t.function(&[&rc, &port, &up, &down], 0x1000, 0x060400, numa);
                let at = [rc.as_str(), port.as_str(), up.as_str(), down.as_str(), leaf.as_str()];
                if d < 2 {
                    t.function(&at, NVIDIA, 0x030200, numa);
                } else {
                    let efa = s * 4 + (d - 2);
                    t.rdma(&format!("rdmap{}s0", 100 + efa), &at, 0x1d0f, numa);
                }
            }
        }
        t.function(&["pci0000:f0", "0000:f0:01.0", "0000:f1:00.0"], NVIDIA, 0x068000, 1);
        t.function(&["pci0000:f0", "0000:f0:02.0", "0000:f2:00.0"], 0x1d0f, 0x020000, 1);
        t
    }

    #[test]
    fn a_p5en_gives_each_gpu_the_two_efa_devices_of_its_switch_half() {
        let t = p5en();
        let topo = Topology::from_sysfs(&t.root).unwrap();
        assert_eq!(topo.gpus.len(), 8, "NVSwitches are not GPUs: {:?}", topo.gpus);
        assert_eq!(topo.nics.len(), 16, "the ENA is not an RDMA NIC");
        assert!(topo.nics.iter().all(RdmaNic::is_efa));
        let map = topo.gpu_nic_map();
        for g in 0..8usize {
            let (nics, near) = &map[&g];
            let want: Vec<String> = (0..2).map(|i| format!("rdmap{}s0", 100 + 2 * g + i)).collect();
            assert_eq!((nics, *near), (&want, Nearness::Switch), "GPU {g}");
        }
        assert_eq!(topo.gpus[3].pci.numa_node, Some(0));
        assert_eq!(topo.gpus[4].pci.numa_node, Some(1));
    }

    /// A DGX H100-like node: 8 GPUs, each with one ConnectX-7 on its own
    /// PCIe switch, two switches per root complex.
    #[test]
    fn a_dgx_h100_gives_each_gpu_its_connectx() {
        let t = Tree::new("dgx");
        for g in 0..8u32 {
            let rc = format!("pci0000:{:02x}", 0x10 * (g / 2));
            let port = format!("0000:{:02x}:{:02x}.0", 0x10 * (g / 2), g % 2 + 1);
            let sw = format!("0000:{:02x}:00.0", 0x10 * (g / 2) + 2 + 4 * (g % 2));
            let gd = format!("0000:{:02x}:00.0", 0x10 * (g / 2) + 3 + 4 * (g % 2));
            let nd = format!("0000:{:02x}:00.0", 0x10 * (g / 2) + 4 + 4 * (g % 2));
            let numa = (g / 4) as i32;
            t.function(&[&rc, &port], 0x8086, 0x060400, numa);
            t.function(&[&rc, &port, &sw], 0x1000, 0x060400, numa);
            t.function(&[&rc, &port, &sw, &gd], NVIDIA, 0x030200, numa);
            // mlx5 names in another order than the GPUs', as happens.
            t.rdma(&format!("mlx5_{}", 7 - g), &[&rc, &port, &sw, &nd], 0x15b3, numa);
        }
        let topo = Topology::from_sysfs(&t.root).unwrap();
        assert_eq!((topo.gpus.len(), topo.nics.len()), (8, 8));
        for g in 0..8 {
            let (nics, near) = topo.nics_for_gpu(g).unwrap();
            let names: Vec<&str> = nics.iter().map(|n| n.name.as_str()).collect();
            assert_eq!((names, near), (vec![format!("mlx5_{}", 7 - g).as_str()], Nearness::Switch), "GPU {g}");
        }
        assert!(topo.nics_for_gpu(8).is_none());
    }

    /// No shared PCIe ancestor: the GPU's NUMA node decides, else any NIC.
    #[test]
    fn without_a_shared_switch_the_numa_node_decides() {
        let t = Tree::new("numa");
        t.function(&["pci0000:00", "0000:00:01.0", "0000:01:00.0"], NVIDIA, 0x030000, 0);
        t.function(&["pci0000:80", "0000:80:01.0", "0000:81:00.0"], NVIDIA, 0x030200, 1);
        t.rdma("mlx5_0", &["pci0000:40", "0000:40:01.0", "0000:41:00.0"], 0x15b3, 0);
        t.rdma("mlx5_1", &["pci0000:c0", "0000:c0:01.0", "0000:c1:00.0"], 0x15b3, 1);
        t.rdma("mlx5_2", &["pci0000:c8", "0000:c8:01.0", "0000:c9:00.0"], 0x15b3, -1);
        let topo = Topology::from_sysfs(&t.root).unwrap();
        let names = |g| {
            let (nics, near) = topo.nics_for_gpu(g).unwrap();
            (nics.iter().map(|n| n.name.clone()).collect::<Vec<_>>(), near)
        };
        assert_eq!(names(0), (vec!["mlx5_0".to_string()], Nearness::NumaNode));
        assert_eq!(names(1), (vec!["mlx5_1".to_string()], Nearness::NumaNode));
        assert_eq!(topo.nics[2].pci.numa_node, None);
        // Only ConnectX wanted, and none there: no NIC for the GPU.
        assert!(topo.nics_for_gpu_where(0, RdmaNic::is_efa).is_none());
        // A second GPU on node 0 shares its NICs with the first: divided.
        t.function(&["pci0000:10", "0000:10:01.0", "0000:11:00.0"], NVIDIA, 0x030200, 0);
        t.rdma("mlx5_3", &["pci0000:48", "0000:48:01.0", "0000:49:00.0"], 0x15b3, 0);
        let topo = Topology::from_sysfs(&t.root).unwrap();
        let names = |g| topo.nics_for_gpu(g).unwrap().0.iter().map(|n| n.name.clone()).collect::<Vec<_>>();
        assert_eq!((names(0), names(1)), (vec!["mlx5_0".to_string()], vec!["mlx5_3".to_string()]));
    }

    #[test]
    fn a_tree_without_gpus_or_nics_is_empty_and_a_missing_one_an_error() {
        let t = Tree::new("empty");
        t.function(&["pci0000:00", "0000:00:02.0"], 0x1af4, 0x020000, -1);
        let topo = Topology::from_sysfs(&t.root).unwrap();
        assert!(topo.gpus.is_empty() && topo.nics.is_empty() && topo.gpu_nic_map().is_empty());
        assert!(topo.nics_for_gpu(0).is_none());
        assert!(Topology::from_sysfs(&t.root.join("nowhere")).is_err());
    }
}
