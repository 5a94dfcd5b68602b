//! Polled 16550 UART on COM1: the kernel console.
use crate::arch::{inb, outb};
use core::fmt::{self, Write};

const COM1: u16 = 0x3f8;

/// Programs 115200 8N1, FIFOs on, no interrupts.
pub fn init() {
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x80);
    outb(COM1, 0x01);
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0xC7);
    outb(COM1 + 4, 0x03);
}

/// Writes one byte, waiting for the transmitter.
pub fn putb(b: u8) {
    while inb(COM1 + 5) & 0x20 == 0 {
        core::hint::spin_loop();
    }
    outb(COM1, b);
}

/// Writes raw bytes.
pub fn write_bytes(s: &[u8]) {
    for &b in s {
        putb(b);
    }
}

struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Formats to the console.
pub fn print(args: fmt::Arguments) {
    // Console::write_str never fails.
    let _ = Console.write_fmt(args);
}
