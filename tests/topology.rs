//! `EngineBuilder::for_gpu` on this machine: the GPU -> NIC map sysfs
//! gives (printed), and a GPU the machine lacks refused when the engine is
//! built. The selection itself is tested on synthetic sysfs trees (p5en,
//! DGX H100) in `src/topology.rs`.

use strait::topology::Topology;
use strait::{Error, Provider, TransferEngine};

#[test]
fn engines_are_placed_for_gpus_the_machine_has_and_refused_for_others() {
    let topology = Topology::discover().expect("sysfs readable");
    println!("GPUs: {}, RDMA NICs: {}, map: {:?}", topology.gpus.len(), topology.nics.len(), topology.gpu_nic_map());
    let missing = topology.gpus.len();
    let err = TransferEngine::builder().provider(Provider::Tcp).interface("lo").for_gpu(missing).build().unwrap_err();
    assert!(matches!(&err, Error::InvalidRequest(m) if m.contains(&format!("GPU {missing} not found"))), "{err}");
    if topology.gpus.is_empty() {
        println!("SKIPPED placing an engine for GPU 0 (hardware): no NVIDIA GPU in /sys/bus/pci/devices");
        return;
    }
    // tcp is not placed by the GPU's NICs: the engine opens as usual.
    let e = TransferEngine::builder().provider(Provider::Tcp).interface("lo").for_gpu(0).build().unwrap();
    assert_eq!(e.nic_count(), 1, "tcp keeps its own NIC count");
    e.shutdown();
}
