//! A linear device maps its sectors onto the backend at the offset, for every operation.

use std::sync::Arc;

use udm_drivers::backends::mem::MemDevice;
use udm_drivers::dma::PagePolicy;
use udm_drivers::BlockDevice;
use udm_mapping::sync_io;
use udm_mapping::{Registry, TableSlot};

fn mem(bytes: u64) -> Arc<dyn BlockDevice> {
    Arc::new(MemDevice::with_policy(bytes, 512, PagePolicy::Normal).unwrap())
}

#[test]
fn linear_maps_onto_backend_at_offset() {
    let reg = Registry::new();
    let disk = mem(1 << 20);
    reg.register_backend("disk0", Arc::clone(&disk)).unwrap();
    reg.create("vol", None, Some("0 100 linear disk0 200\n100 28 zero")).unwrap();
    assert_eq!(reg.table("vol", TableSlot::Live).unwrap(), "0 100 linear disk0 200\n100 28 zero \n");
    let vol = reg.device("vol").unwrap();
    assert_eq!(vol.info().sectors, 128);

    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    sync_io::write(vol.as_ref(), 96, &data, false).unwrap();
    let mut back = vec![0u8; 2048];
    sync_io::read(disk.as_ref(), 296, &mut back).unwrap();
    assert_eq!(&back[..], &data[..2048], "the part inside the linear segment lands at offset 200");
    let mut through = vec![0xffu8; 4096];
    sync_io::read(vol.as_ref(), 96, &mut through).unwrap();
    assert_eq!(&through[..2048], &data[..2048]);
    assert!(through[2048..].iter().all(|&b| b == 0), "the zero segment reads zeroes");
    assert!(sync_io::flush(vol.as_ref()).is_ok());
}
