"""The peripherals the agent brokers for its applications: GPIO, UART, I2C, SPI, ADC and PWM.

An application never opens a device file itself: it asks the agent (``gpio.read``, ``i2c.transfer``, … in
:mod:`fleetward.agent.app_api`), the agent checks the request against the application's manifest, and only
then calls the :class:`Peripherals` interface. Two implementations:

- :class:`SimulatedPeripherals`, the default of the simulator and of the tests: every declared peripheral
  exists, readings are deterministic and scriptable, and every write is recorded (:attr:`writes`). GPIO pins
  read their last written level (0 at first) unless a reading was scripted; a UART echoes what is written
  to it (loopback) and can be fed; an I2C device is a 256-byte register memory (the first byte written sets
  the register pointer, the rest is stored from there, and reads continue from the pointer), and an address
  with no device fails as a NACK would; SPI answers scripted bytes (zeros otherwise); ADC channels answer
  scripted values (``default_adc_value`` otherwise); PWM settings are kept.
- :class:`LinuxPeripherals`, partial, on Linux's own interfaces (see its docstring for exactly what).

The methods block (device I/O); the application API runs them on a small thread pool of its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import select
import struct
import termios
import threading
import tty
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from fleetward.agent.manifest import Peripheral
from fleetward.errors import Conflict, NotFound, TransportError

#: The baud rates a UART may be opened with.
BAUD_RATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
I2C_REGISTER_BYTES = 256


class PeripheralUnavailable(NotFound):
    """The peripheral is declared, but this machine has no such device (or the backend cannot drive it)."""

    default_code = "peripheral_unavailable"


class PeripheralFailed(TransportError):
    """The device answered with an error: an I/O error, a NACK on a bus, a timeout."""

    default_code = "peripheral_failed"


class PeripheralBusy(Conflict):
    """The device is held by another application (a UART is opened by one application at a time)."""

    default_code = "peripheral_busy"


class UartPort(Protocol):
    """An opened UART; closed by the application API when the application's connection ends."""

    def write(self, data: bytes) -> int: ...

    def read(self, max_bytes: int, timeout_seconds: float) -> bytes: ...

    def close(self) -> None: ...


class Peripherals(Protocol):
    """The hardware, as the application API drives it. Every method may block; none checks capabilities
    (the API does that before it calls). Failures raise :class:`PeripheralUnavailable`,
    :class:`PeripheralFailed` or :class:`PeripheralBusy`."""

    def gpio_read(self, pin: Peripheral) -> int: ...

    def gpio_write(self, pin: Peripheral, value: int) -> None: ...

    def uart_open(self, name: Peripheral, baud_rate: int) -> UartPort: ...

    def i2c_transfer(self, bus: Peripheral, address: int, write: bytes, read_length: int) -> bytes: ...

    def spi_transfer(self, bus: Peripheral, chip_select: int, write: bytes, read_length: int) -> bytes: ...

    def adc_read(self, controller: Peripheral, channel: int) -> int: ...

    def pwm_set(
        self, controller: Peripheral, channel: int, period_ns: int, duty_ns: int, enabled: bool
    ) -> None: ...


# ---------------------------------------------------------------------- simulated


@dataclass(frozen=True)
class PeripheralWrite:
    """One write the simulated hardware saw, in order."""

    kind: Literal["gpio", "uart", "i2c", "spi", "pwm"]
    target: str
    value: int | bytes | tuple[int, int, bool]


@dataclass(frozen=True)
class PwmSetting:
    period_ns: int
    duty_ns: int
    enabled: bool


def _key(*parts: Peripheral | int) -> str:
    return "/".join(str(part) for part in parts)


class _SimulatedUart:
    def __init__(self, owner: SimulatedPeripherals, name: str) -> None:
        self._owner = owner
        self._name = name
        self._closed = False

    def write(self, data: bytes) -> int:
        self._check_open()
        return self._owner._uart_written(self._name, data)

    def read(self, max_bytes: int, timeout_seconds: float) -> bytes:
        self._check_open()
        return self._owner._uart_read(self._name, max_bytes, timeout_seconds)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner._uart_closed(self._name)

    def _check_open(self) -> None:
        if self._closed:
            raise PeripheralFailed(f"UART {self._name} is closed", code="uart_not_open")


class SimulatedPeripherals:
    """Deterministic hardware for the simulator and the tests. Thread-safe: the API calls it from threads."""

    def __init__(self, *, uart_echo: bool = True, default_adc_value: int = 2048) -> None:
        self.writes: list[PeripheralWrite] = []
        self._uart_echo = uart_echo
        self._default_adc = default_adc_value
        self._lock = threading.Lock()
        self._uart_data = threading.Condition(self._lock)
        self._gpio: dict[str, int] = {}
        self._gpio_script: dict[str, deque[int]] = {}
        self._uart_rx: dict[str, bytearray] = {}
        self._uart_open: set[str] = set()
        self._i2c: dict[str, bytearray] = {}
        self._i2c_pointer: dict[str, int] = {}
        self._spi_script: dict[str, deque[bytes]] = {}
        self._adc_script: dict[str, deque[int]] = {}
        self._adc_last: dict[str, int] = {}
        self._pwm: dict[str, PwmSetting] = {}

    # --- scripting

    def script_gpio(self, pin: Peripheral, *levels: int) -> None:
        """The next readings of ``pin``, in order; after them, it reads its level again."""
        with self._lock:
            self._gpio_script.setdefault(_key(pin), deque()).extend(1 if level else 0 for level in levels)

    def feed_uart(self, name: Peripheral, data: bytes) -> None:
        """Bytes that arrive on the UART, as if a device sent them."""
        with self._uart_data:
            self._uart_rx.setdefault(_key(name), bytearray()).extend(data)
            self._uart_data.notify_all()

    def add_i2c_device(
        self, bus: Peripheral, address: int, registers: Mapping[int, bytes] | None = None
    ) -> None:
        """A device at ``address`` on ``bus``: 256 bytes of registers, zero unless given."""
        memory = bytearray(I2C_REGISTER_BYTES)
        for register, value in (registers or {}).items():
            for offset, byte in enumerate(value):
                memory[(register + offset) % I2C_REGISTER_BYTES] = byte
        with self._lock:
            self._i2c[_key(bus, address)] = memory
            self._i2c_pointer[_key(bus, address)] = 0

    def script_spi(self, bus: Peripheral, chip_select: int, *responses: bytes) -> None:
        """What the next transfers on ``bus``/``chip_select`` read, in order (cut or zero-padded)."""
        with self._lock:
            self._spi_script.setdefault(_key(bus, chip_select), deque()).extend(responses)

    def script_adc(self, controller: Peripheral, channel: int, *values: int) -> None:
        """The next readings of a channel, in order; the last one repeats after them."""
        with self._lock:
            self._adc_script.setdefault(_key(controller, channel), deque()).extend(values)

    def pwm_setting(self, controller: Peripheral, channel: int) -> PwmSetting | None:
        with self._lock:
            return self._pwm.get(_key(controller, channel))

    # --- Peripherals

    def gpio_read(self, pin: Peripheral) -> int:
        with self._lock:
            script = self._gpio_script.get(_key(pin))
            if script:
                return script.popleft()
            return self._gpio.get(_key(pin), 0)

    def gpio_write(self, pin: Peripheral, value: int) -> None:
        with self._lock:
            self._gpio[_key(pin)] = 1 if value else 0
            self.writes.append(PeripheralWrite("gpio", _key(pin), 1 if value else 0))

    def uart_open(self, name: Peripheral, baud_rate: int) -> UartPort:
        if baud_rate not in BAUD_RATES:
            raise PeripheralFailed(f"UART {name}: {baud_rate} baud is not supported", code="uart_baud_rate")
        with self._lock:
            if _key(name) in self._uart_open:
                raise PeripheralBusy(f"UART {name} is already open")
            self._uart_open.add(_key(name))
        return _SimulatedUart(self, _key(name))

    def _uart_written(self, name: str, data: bytes) -> int:
        with self._uart_data:
            self.writes.append(PeripheralWrite("uart", name, bytes(data)))
            if self._uart_echo:
                self._uart_rx.setdefault(name, bytearray()).extend(data)
                self._uart_data.notify_all()
        return len(data)

    def _uart_read(self, name: str, max_bytes: int, timeout_seconds: float) -> bytes:
        with self._uart_data:
            self._uart_data.wait_for(lambda: bool(self._uart_rx.get(name)), timeout=timeout_seconds)
            buffer = self._uart_rx.get(name, bytearray())
            data = bytes(buffer[:max_bytes])
            del buffer[:max_bytes]
            return data

    def _uart_closed(self, name: str) -> None:
        with self._lock:
            self._uart_open.discard(name)

    def i2c_transfer(self, bus: Peripheral, address: int, write: bytes, read_length: int) -> bytes:
        key = _key(bus, address)
        with self._lock:
            memory = self._i2c.get(key)
            if memory is None:
                raise PeripheralFailed(f"no device answered at address {address:#04x} on I2C bus {bus}")
            pointer = self._i2c_pointer[key]
            if write:
                self.writes.append(PeripheralWrite("i2c", key, bytes(write)))
                pointer = write[0]
                for offset, byte in enumerate(write[1:]):
                    memory[(pointer + offset) % I2C_REGISTER_BYTES] = byte
                if len(write) > 1:
                    pointer = (pointer + len(write) - 1) % I2C_REGISTER_BYTES
            data = bytes(memory[(pointer + offset) % I2C_REGISTER_BYTES] for offset in range(read_length))
            self._i2c_pointer[key] = (pointer + read_length) % I2C_REGISTER_BYTES
            return data

    def spi_transfer(self, bus: Peripheral, chip_select: int, write: bytes, read_length: int) -> bytes:
        key = _key(bus, chip_select)
        with self._lock:
            if write:
                self.writes.append(PeripheralWrite("spi", key, bytes(write)))
            script = self._spi_script.get(key)
            answer = script.popleft() if script else b""
            return answer[:read_length].ljust(read_length, b"\x00")

    def adc_read(self, controller: Peripheral, channel: int) -> int:
        key = _key(controller, channel)
        with self._lock:
            script = self._adc_script.get(key)
            if script:
                self._adc_last[key] = script.popleft()
            return self._adc_last.get(key, self._default_adc)

    def pwm_set(
        self, controller: Peripheral, channel: int, period_ns: int, duty_ns: int, enabled: bool
    ) -> None:
        key = _key(controller, channel)
        with self._lock:
            self._pwm[key] = PwmSetting(period_ns, duty_ns, enabled)
            self.writes.append(PeripheralWrite("pwm", key, (period_ns, duty_ns, enabled)))


# ---------------------------------------------------------------------- Linux

_I2C_RDWR = 0x0707
_I2C_M_RD = 0x0001
_SPI_TRANSFER_BYTES = 32
_TTY_NAME = re.compile(r"tty[A-Za-z0-9]+")
_NUMBERED = re.compile(r"(?:i2c-|spidev|iio:device|pwmchip)?([0-9]{1,5})")


class _I2cMessage(ctypes.Structure):
    _fields_ = (
        ("addr", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("len", ctypes.c_uint16),
        ("buf", ctypes.POINTER(ctypes.c_uint8)),
    )


class _I2cTransfer(ctypes.Structure):
    _fields_ = (
        ("msgs", ctypes.POINTER(_I2cMessage)),
        ("nmsgs", ctypes.c_uint32),
    )


def spi_message_request(transfers: int) -> int:
    """``SPI_IOC_MESSAGE(n)``: ``_IOW('k', 0, char[n * sizeof(struct spi_ioc_transfer)])``."""
    size = transfers * _SPI_TRANSFER_BYTES
    return (1 << 30) | (size << 16) | (ord("k") << 8)


def spi_transfer_struct(tx_address: int, rx_address: int, length: int) -> bytes:
    """One ``struct spi_ioc_transfer`` (32 bytes): buffers, length, and the device's defaults otherwise."""
    return struct.pack("=QQIIHBBBBBB", tx_address, rx_address, length, 0, 0, 0, 0, 0, 0, 0, 0)


@dataclass(frozen=True)
class LinuxPeripheralMap:
    """Where the manifest's peripheral names are on this machine. A name not mapped here falls back to the
    conventions in :class:`LinuxPeripherals`; the roots are settable so that tests use a fake tree."""

    gpio: Mapping[str, int] = field(default_factory=dict)
    uart: Mapping[str, Path] = field(default_factory=dict)
    i2c: Mapping[str, Path] = field(default_factory=dict)
    #: a bus name to the device path without its chip select: ``/dev/spidev0`` (``.{cs}`` is appended)
    spi: Mapping[str, Path] = field(default_factory=dict)
    #: a controller name to its IIO device directory
    adc: Mapping[str, Path] = field(default_factory=dict)
    #: a controller name to its ``pwmchipN`` directory
    pwm: Mapping[str, Path] = field(default_factory=dict)
    sysfs_root: Path = Path("/sys")
    dev_root: Path = Path("/dev")


class LinuxPeripherals:
    """Peripherals through Linux's own interfaces. Partial, and exactly this:

    - **GPIO**: the legacy sysfs interface, ``/sys/class/gpio/gpioN/{direction,value}``: an integer pin is
      the kernel's GPIO number (a named pin needs an entry in :attr:`LinuxPeripheralMap.gpio`); a pin not
      yet exported is exported; a write sets the direction to ``out`` first; a read reads ``value`` as it is.
      The GPIO character device (``/dev/gpiochipN``, its ioctls) is not supported, nor are kernels built
      without ``CONFIG_GPIO_SYSFS``.
    - **UART**: a ``ttyX`` name is ``/dev/ttyX`` (others need a map entry); opened raw (no echo, no line
      discipline), 8N1, no flow control, at a baud rate of :data:`BAUD_RATES`, with ``TIOCEXCL``; one
      application at a time.
    - **I2C**: bus ``N`` (or ``i2c-N``) is ``/dev/i2c-N``; one ``I2C_RDWR`` ioctl with a write message and
      a read message (repeated start), 7-bit addresses. No SMBus-only adapters.
    - **SPI**: bus ``B`` (or ``spidevB``) with chip select ``C`` is ``/dev/spidevB.C``; one
      ``SPI_IOC_MESSAGE(2)``: the write, then the read, with chip select held, at the device's configured
      mode, speed and word size (not settable through the API).
    - **ADC**: controller ``N`` (or ``iio:deviceN``) is ``/sys/bus/iio/devices/iio:deviceN``; a reading is
      ``in_voltage{channel}_raw`` (raw counts; no scaling).
    - **PWM**: controller ``N`` (or ``pwmchipN``) is ``/sys/class/pwm/pwmchipN``; the channel is exported
      when needed, then ``duty_cycle`` 0, ``period``, ``duty_cycle`` and ``enable`` are written.

    The I2C and SPI ioctls have not been run on hardware in fleetward's tests (this machine has none); the
    sysfs paths and the UART are tested against a fake tree and a pseudo-terminal.
    """

    def __init__(self, devices: LinuxPeripheralMap | None = None) -> None:
        self._map = devices or LinuxPeripheralMap()
        self._lock = threading.Lock()
        self._uarts_open: set[Path] = set()

    # --- where things are

    def _number(self, name: Peripheral, what: str) -> int:
        if isinstance(name, int):
            return name
        match = _NUMBERED.fullmatch(name)
        if match is None:
            raise PeripheralUnavailable(f"{what} {name!r} is not mapped to a device on this machine")
        return int(match.group(1))

    def _gpio_dir(self, pin: Peripheral) -> Path:
        number = self._map.gpio.get(str(pin)) if isinstance(pin, str) else pin
        if number is None:
            raise PeripheralUnavailable(f"GPIO {pin!r} is not mapped to a GPIO number on this machine")
        base = self._map.sysfs_root / "class" / "gpio"
        directory = base / f"gpio{number}"
        if not directory.exists():
            _write_text(base / "export", str(number), f"GPIO {pin}")
        if not directory.exists():
            raise PeripheralUnavailable(f"GPIO {pin!r} (number {number}) does not exist on this machine")
        return directory

    def _uart_path(self, name: Peripheral) -> Path:
        mapped = self._map.uart.get(str(name))
        if mapped is not None:
            return mapped
        if isinstance(name, str) and _TTY_NAME.fullmatch(name):
            return self._map.dev_root / name
        raise PeripheralUnavailable(f"UART {name!r} is not mapped to a device on this machine")

    def _i2c_path(self, bus: Peripheral) -> Path:
        mapped = self._map.i2c.get(str(bus))
        return mapped or self._map.dev_root / f"i2c-{self._number(bus, 'I2C bus')}"

    def _spi_path(self, bus: Peripheral, chip_select: int) -> Path:
        mapped = self._map.spi.get(str(bus))
        prefix = mapped or self._map.dev_root / f"spidev{self._number(bus, 'SPI bus')}"
        return prefix.with_name(f"{prefix.name}.{chip_select}")

    def _adc_dir(self, controller: Peripheral) -> Path:
        mapped = self._map.adc.get(str(controller))
        number = None if mapped else self._number(controller, "ADC controller")
        return mapped or self._map.sysfs_root / "bus" / "iio" / "devices" / f"iio:device{number}"

    def _pwm_dir(self, controller: Peripheral) -> Path:
        mapped = self._map.pwm.get(str(controller))
        number = None if mapped else self._number(controller, "PWM controller")
        return mapped or self._map.sysfs_root / "class" / "pwm" / f"pwmchip{number}"

    # --- Peripherals

    def gpio_read(self, pin: Peripheral) -> int:
        text = _read_text(self._gpio_dir(pin) / "value", f"GPIO {pin}")
        return 1 if text.strip() not in ("", "0") else 0

    def gpio_write(self, pin: Peripheral, value: int) -> None:
        directory = self._gpio_dir(pin)
        _write_text(directory / "direction", "out", f"GPIO {pin}")
        _write_text(directory / "value", "1" if value else "0", f"GPIO {pin}")

    def uart_open(self, name: Peripheral, baud_rate: int) -> UartPort:
        if baud_rate not in BAUD_RATES:
            raise PeripheralFailed(f"UART {name}: {baud_rate} baud is not supported", code="uart_baud_rate")
        path = self._uart_path(name)
        with self._lock:
            if path in self._uarts_open:
                raise PeripheralBusy(f"UART {name} is already open")
            self._uarts_open.add(path)
        try:
            return _LinuxUart(path, baud_rate, lambda: self._uart_closed(path))
        except BaseException:
            self._uart_closed(path)
            raise

    def _uart_closed(self, path: Path) -> None:
        with self._lock:
            self._uarts_open.discard(path)

    def i2c_transfer(self, bus: Peripheral, address: int, write: bytes, read_length: int) -> bytes:
        path = self._i2c_path(bus)
        write_buffer = (ctypes.c_uint8 * max(len(write), 1)).from_buffer_copy(write.ljust(1, b"\x00"))
        read_buffer = (ctypes.c_uint8 * max(read_length, 1))()
        messages: list[_I2cMessage] = []
        if write:
            messages.append(_I2cMessage(address, 0, len(write), write_buffer))
        if read_length:
            messages.append(_I2cMessage(address, _I2C_M_RD, read_length, read_buffer))
        if not messages:
            return b""
        array = (_I2cMessage * len(messages))(*messages)
        request = _I2cTransfer(array, len(messages))
        with _opened(path, os.O_RDWR, f"I2C bus {bus}") as descriptor:
            try:
                fcntl.ioctl(descriptor, _I2C_RDWR, request)
            except OSError as error:
                raise PeripheralFailed(
                    f"I2C bus {bus}, address {address:#04x}: {os.strerror(error.errno or errno.EIO)}"
                ) from None
        return bytes(read_buffer)[:read_length]

    def spi_transfer(self, bus: Peripheral, chip_select: int, write: bytes, read_length: int) -> bytes:
        path = self._spi_path(bus, chip_select)
        tx = ctypes.create_string_buffer(write, max(len(write), 1))
        rx = ctypes.create_string_buffer(max(read_length, 1))
        transfers = b""
        if write:
            transfers += spi_transfer_struct(ctypes.addressof(tx), 0, len(write))
        if read_length:
            transfers += spi_transfer_struct(0, ctypes.addressof(rx), read_length)
        if not transfers:
            return b""
        with _opened(path, os.O_RDWR, f"SPI bus {bus}.{chip_select}") as descriptor:
            try:
                fcntl.ioctl(descriptor, spi_message_request(len(transfers) // _SPI_TRANSFER_BYTES), transfers)
            except OSError as error:
                raise PeripheralFailed(
                    f"SPI bus {bus}.{chip_select}: {os.strerror(error.errno or errno.EIO)}"
                ) from None
        return rx.raw[:read_length]

    def adc_read(self, controller: Peripheral, channel: int) -> int:
        path = self._adc_dir(controller) / f"in_voltage{channel}_raw"
        text = _read_text(path, f"ADC {controller} channel {channel}").strip()
        try:
            return int(text)
        except ValueError:
            raise PeripheralFailed(f"ADC {controller} channel {channel} read {text[:32]!r}") from None

    def pwm_set(
        self, controller: Peripheral, channel: int, period_ns: int, duty_ns: int, enabled: bool
    ) -> None:
        chip = self._pwm_dir(controller)
        what = f"PWM {controller} channel {channel}"
        if not chip.exists():
            raise PeripheralUnavailable(f"{what}: no such PWM controller on this machine")
        directory = chip / f"pwm{channel}"
        if not directory.exists():
            _write_text(chip / "export", str(channel), what)
        _write_text(directory / "duty_cycle", "0", what)
        _write_text(directory / "period", str(period_ns), what)
        _write_text(directory / "duty_cycle", str(duty_ns), what)
        _write_text(directory / "enable", "1" if enabled else "0", what)


class _LinuxUart:
    def __init__(self, path: Path, baud_rate: int, on_close: Callable[[], None]) -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PeripheralUnavailable(f"UART {path} does not exist on this machine") from None
        except OSError as error:
            raise PeripheralFailed(f"UART {path}: {error.strerror}") from None
        self._path = path
        self._on_close = on_close
        try:
            fcntl.ioctl(self._fd, termios.TIOCEXCL)
            tty.setraw(self._fd)
            attributes = termios.tcgetattr(self._fd)
            speed = getattr(termios, f"B{baud_rate}")
            attributes[2] = (attributes[2] & ~(termios.CSTOPB | termios.PARENB | termios.CRTSCTS)) | (
                termios.CLOCAL | termios.CREAD
            )
            attributes[4], attributes[5] = speed, speed
            termios.tcsetattr(self._fd, termios.TCSANOW, attributes)
        except (OSError, termios.error) as error:
            os.close(self._fd)
            raise PeripheralFailed(f"UART {path} cannot be set up: {error}") from None

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        written = 0
        while written < len(view):
            _, ready, _ = select.select([], [self._fd], [], 5.0)
            if not ready:
                raise PeripheralFailed(f"UART {self._path}: the write did not finish within 5 s")
            try:
                written += os.write(self._fd, view[written:])
            except BlockingIOError:
                continue
            except OSError as error:
                raise PeripheralFailed(f"UART {self._path}: {error.strerror}") from None
        return written

    def read(self, max_bytes: int, timeout_seconds: float) -> bytes:
        ready, _, _ = select.select([self._fd], [], [], timeout_seconds)
        if not ready:
            return b""
        try:
            return os.read(self._fd, max_bytes)
        except BlockingIOError:
            return b""
        except OSError as error:
            raise PeripheralFailed(f"UART {self._path}: {error.strerror}") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._on_close()


@contextlib.contextmanager
def _opened(path: Path, flags: int, what: str) -> Iterator[int]:
    """A device opened (and closed after), its absence said plainly."""
    try:
        descriptor = os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PeripheralUnavailable(f"{what}: {path} does not exist on this machine") from None
    except OSError as error:
        raise PeripheralFailed(f"{what}: {path}: {error.strerror}") from None
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def _read_text(path: Path, what: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read(64)
    except FileNotFoundError:
        raise PeripheralUnavailable(f"{what}: {path} does not exist on this machine") from None
    except OSError as error:
        raise PeripheralFailed(f"{what}: {path}: {error.strerror}") from None


def _write_text(path: Path, text: str, what: str) -> None:
    try:  # never O_CREAT: a sysfs attribute exists or the device does not
        descriptor = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(descriptor, text.encode("ascii"))
        finally:
            os.close(descriptor)
    except FileNotFoundError:
        raise PeripheralUnavailable(f"{what}: {path} does not exist on this machine") from None
    except OSError as error:
        raise PeripheralFailed(f"{what}: {path}: {error.strerror}") from None
