//! Legacy PC devices: the 8250 UART and the i8042 (reset line and keyboard).

pub mod i8042;
pub mod serial;

pub use i8042::{I8042Error, I8042};
pub use serial::{SerialDevice, SerialInput};
