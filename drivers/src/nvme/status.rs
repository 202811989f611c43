//! Names for NVMe status codes (NVMe Base Specification 2.0, 4.6.1.2), so that a failed
//! command reads as "LBA Out of Range", not "0/0x80".

/// The name of status code `sc` of status code type `sct`.
pub fn status_name(sct: u8, sc: u8) -> &'static str {
    match (sct, sc) {
        (0, 0x00) => "Successful Completion",
        (0, 0x01) => "Invalid Command Opcode",
        (0, 0x02) => "Invalid Field in Command",
        (0, 0x03) => "Command ID Conflict",
        (0, 0x04) => "Data Transfer Error",
        (0, 0x05) => "Commands Aborted due to Power Loss Notification",
        (0, 0x06) => "Internal Error",
        (0, 0x07) => "Command Abort Requested",
        (0, 0x08) => "Command Aborted due to SQ Deletion",
        (0, 0x0b) => "Invalid Namespace or Format",
        (0, 0x0c) => "Command Sequence Error",
        (0, 0x0f) => "Invalid Number of SGL Descriptors",
        (0, 0x10) => "Data SGL Length Invalid",
        (0, 0x13) => "PRP Offset Invalid",
        (0, 0x15) => "Operation Denied",
        (0, 0x80) => "LBA Out of Range",
        (0, 0x81) => "Capacity Exceeded",
        (0, 0x82) => "Namespace Not Ready",
        (1, 0x00) => "Completion Queue Invalid",
        (1, 0x01) => "Invalid Queue Identifier",
        (1, 0x02) => "Invalid Queue Size",
        (1, 0x03) => "Abort Command Limit Exceeded",
        (1, 0x0d) => "Feature Identifier Not Saveable",
        (1, 0x0e) => "Feature Not Changeable",
        (1, 0x0f) => "Feature Not Namespace Specific",
        (1, 0x80) => "Conflicting Attributes",
        (1, 0x82) => "Attempted Write to Read Only Range",
        (2, 0x80) => "Write Fault",
        (2, 0x81) => "Unrecovered Read Error",
        (2, 0x82) => "End-to-end Guard Check Error",
        (2, 0x85) => "Compare Failure",
        (2, 0x86) => "Access Denied",
        (2, 0x87) => "Deallocated or Unwritten Logical Block",
        (3, _) => "Path Related Status",
        (7, _) => "Vendor Specific",
        _ => "unknown status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_statuses_udm_meets() {
        assert_eq!(status_name(0, 0x80), "LBA Out of Range");
        assert_eq!(status_name(2, 0x81), "Unrecovered Read Error");
        assert_eq!(status_name(5, 0x01), "unknown status");
    }
}
