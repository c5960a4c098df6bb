//! COM1: a 16550 UART (vm-superio) whose output goes to the console sink, and whose input comes
//! from the host (stdin when the console is stdio).

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// The line an image's init prints before powering off after `ftvm.exec`.
pub const EXIT_STATUS_MARKER: &str = "ftvm-exit-status: ";

/// Raises the UART's interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where console output goes, with the last exit-status marker seen in it.
pub struct Console {
    sink: Box<dyn Write + Send>,
    line: Vec<u8>,
    exit_status: Arc<Mutex<Option<i32>>>,
}

impl Console {
    /// A console writing to `sink`; `exit_status` receives the value of an exit marker line.
    pub fn new(sink: Box<dyn Write + Send>, exit_status: Arc<Mutex<Option<i32>>>) -> Self {
        Self {
            sink,
            line: Vec::new(),
            exit_status,
        }
    }

    fn scan(&mut self, buf: &[u8]) {
        for &b in buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line);
                if let Some(rest) = line.trim_end_matches('\r').strip_prefix(EXIT_STATUS_MARKER) {
                    if let Ok(code) = rest.trim().parse::<i32>() {
                        *super::lock(&self.exit_status) = Some(code);
                    }
                }
                self.line.clear();
            } else if self.line.len() < 256 {
                self.line.push(b);
            }
        }
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scan(buf);
        // Console output must never stop the guest: a failing sink drops the bytes.
        let _ = self.sink.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sink.flush()
    }
}

/// Size of the UART's receive FIFO (vm-superio's).
const RX_FIFO_LEN: usize = 64;

/// The serial device on the port bus.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, Console>,
}

/// Serializable copy of the UART registers and its receive FIFO.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SerialSnapshot {
    regs: [u8; 9],
    in_buffer: Vec<u8>,
}

impl SerialDevice {
    /// A UART in its reset state.
    pub fn new(irq: EventFd, console: Console) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), console),
        }
    }

    /// Loads `s` into this UART (registers and receive FIFO), keeping its interrupt line and
    /// console: what a failover or a restore into a built VM does.
    pub fn restore(&mut self, s: &SerialSnapshot) -> io::Result<()> {
        if s.in_buffer.len() > RX_FIFO_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "serial state: {} bytes in the receive FIFO, at most {RX_FIFO_LEN} fit",
                    s.in_buffer.len()
                ),
            ));
        }
        let irq = self.uart.interrupt_evt().0.try_clone()?;
        let placeholder = Console::new(Box::new(io::sink()), Arc::default());
        let old = std::mem::replace(
            &mut self.uart,
            Serial::new(IrqTrigger(irq.try_clone()?), placeholder),
        );
        self.uart = Self::uart_from(IrqTrigger(irq), old.into_writer(), s)?;
        Ok(())
    }

    fn uart_from(
        irq: IrqTrigger,
        console: Console,
        s: &SerialSnapshot,
    ) -> io::Result<Serial<IrqTrigger, NoEvents, Console>> {
        let r = s.regs;
        let state = SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: s.in_buffer.clone(),
        };
        Serial::from_state(&state, irq, NoEvents, console)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("serial state: {e:?}")))
    }

    /// The UART registers and FIFO.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Flushes console output.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            let _ = self.uart.write(offset as u8, b);
        }
    }
}
