//! After a failover the guest's MAC address sits behind another switch port: a RARP broadcast
//! with the guest's MAC as source (what QEMU's announce does) makes switches and bridges learn it.

/// The RARP "reverse request" frame announcing `mac`.
pub fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]); // broadcast
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x8035u16.to_be_bytes()); // RARP
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f.push(6);
    f.push(4);
    f.extend_from_slice(&3u16.to_be_bytes()); // reverse request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

#[cfg(test)]
mod tests {
    #[test]
    fn frame_layout() {
        let f = super::rarp_frame([0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[6..12], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
    }
}
