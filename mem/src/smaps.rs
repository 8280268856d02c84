//! Reading the kernel's view of our own mappings from `/proc/self/smaps`:
//! how much of a guest region the host maps with 2 MiB pages (PMDs).

use std::io;

/// `AnonHugePages` of the mapping (VMA) that contains host address `addr`,
/// in bytes; 0 if no mapping contains it.
///
/// # Errors
/// The error of reading `/proc/self/smaps`.
pub fn anon_huge_bytes(addr: usize) -> io::Result<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    Ok(anon_huge_bytes_in(&smaps, addr))
}

/// [`anon_huge_bytes`] over the text of an smaps file.
pub fn anon_huge_bytes_in(smaps: &str, addr: usize) -> u64 {
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = (a..b).contains(&addr);
                continue;
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("AnonHugePages:") {
                let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                return kb * 1024;
            }
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
AnonHugePages:      2048 kB
7f0000400000-7f0000600000 rw-p 00000000 00:00 0
Size:               2048 kB
AnonHugePages:         0 kB
";

    #[test]
    fn finds_the_containing_mapping() {
        assert_eq!(anon_huge_bytes_in(SAMPLE, 0x7f00_0000_1000), 2 << 20);
        assert_eq!(anon_huge_bytes_in(SAMPLE, 0x7f00_0040_0000), 0);
        assert_eq!(anon_huge_bytes_in(SAMPLE, 0x1000), 0);
    }

    #[test]
    fn reads_our_own_smaps() {
        // The stack is mapped; its huge-page count is some number, not an error.
        let x = 0u8;
        assert!(anon_huge_bytes(std::ptr::addr_of!(x) as usize).is_ok());
    }
}
