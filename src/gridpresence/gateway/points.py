"""One point of a point map: where a value lives on an IED and how it is encoded.

A single model for both protocols (so a site file's errors name plain fields, not union
branches); :data:`MODBUS_TABLES` and :data:`DNP3_TABLES` say which fields each table takes.
"""

from __future__ import annotations

import math
import struct
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gridpresence.gateway.driver import DriverError

ModbusTable = Literal["coil", "discrete_input", "holding", "input"]
Dnp3Table = Literal["binary_input", "binary_output", "analog_input", "analog_output", "counter"]
MODBUS_TABLES: frozenset[str] = frozenset(ModbusTable.__args__)  # type: ignore[attr-defined]
DNP3_TABLES: frozenset[str] = frozenset(Dnp3Table.__args__)  # type: ignore[attr-defined]
BIT_TABLES = frozenset({"coil", "discrete_input", "binary_input", "binary_output"})
WRITABLE_TABLES = frozenset({"coil", "holding", "binary_output", "analog_output"})

DataType = Literal["bool", "u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64"]
# Registers per value and the struct code of the big-endian whole.
_LAYOUT: dict[str, tuple[int, str]] = {
    "u16": (1, "H"), "i16": (1, "h"), "u32": (2, "I"), "i32": (2, "i"),
    "u64": (4, "Q"), "i64": (4, "q"), "f32": (2, "f"), "f64": (4, "d"),
}


def decimal_tidy(value: float) -> float:
    """A register scaled by a decimal factor, as the decimal it stands for: 388 x 0.1 is
    38.800000000000004 in binary, shown as 38.8. Fifteen significant digits are what a float
    holds exactly, so nothing a register carries is lost."""
    return float(f"{value:.15g}")

class Point(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="", max_length=64)  # filled from the map's key
    table: ModbusTable | Dnp3Table
    # Modbus: the register or bit address (0-based, as on the wire); DNP3: the point index.
    address: int = Field(ge=0, le=65535)
    type: DataType | None = None  # registers: default u16; bits: bool
    word_order: Literal["big", "little"] = "big"  # little: least significant register first
    byte_order: Literal["big", "little"] = "big"  # little: bytes swapped inside each register
    scale: float = Field(default=1.0, allow_inf_nan=False)
    offset: float = Field(default=0.0, allow_inf_nan=False)
    unit: int | None = Field(default=None, ge=0, le=255)  # Modbus: overrides the IED's unit id
    # Modbus: another point of the map holding a power of ten the value is multiplied by (after
    # scale and offset), read with it: SunSpec's scale factors (W_SF...), -10..10.
    scale_factor: str | None = Field(default=None, max_length=64)
    # DNP3 binary output: latch on/off, or a pulse; select-before-operate instead of direct.
    control: Literal["latch", "pulse"] = "latch"
    pulse_ms: int = Field(default=1000, ge=1, le=3_600_000)
    sbo: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> Point:
        bits = self.table in BIT_TABLES
        if self.table in DNP3_TABLES:
            if self.type is not None:
                raise ValueError("a DNP3 point has no type (the object variation carries it)")
            for name in ("word_order", "byte_order", "unit", "scale_factor"):
                if name in self.model_fields_set:
                    raise ValueError(f"'{name}' applies to Modbus points only")
        else:
            for name in ("control", "pulse_ms", "sbo"):
                if name in self.model_fields_set:
                    raise ValueError(f"'{name}' applies to DNP3 binary outputs only")
            if bits and self.type not in (None, "bool"):
                raise ValueError(f"a {self.table} holds one bit: type must be 'bool'")
            if not bits and self.type == "bool":
                raise ValueError("a register is not a bool: use u16 and a scale, or a coil")
            if self.address + self.width - 1 > 65535:
                raise ValueError("the value runs past register 65535")
        if bits and ({"scale", "offset", "scale_factor"} & self.model_fields_set):
            raise ValueError("a bit has no scale, offset or scale factor")
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        return self

    @property
    def is_bit(self) -> bool:
        return self.table in BIT_TABLES

    @property
    def data_type(self) -> str:
        return self.type or ("bool" if self.is_bit else "u16")

    @property
    def width(self) -> int:
        """Registers (or bits) the value occupies."""
        return 1 if self.is_bit else _LAYOUT[self.data_type][0]

    @property
    def writable(self) -> bool:
        return self.table in WRITABLE_TABLES

    # -- engineering units ----------------------------------------------------------------

    def to_engineering(self, raw: float) -> float:
        return decimal_tidy(raw * self.scale + self.offset)

    def to_raw(self, value: float) -> float:
        return (value - self.offset) / self.scale

    # -- Modbus register encoding (one place for word and byte order) ----------------------

    def decode_registers(self, registers: list[int]) -> float:
        """Registers as read -> engineering value."""
        count, code = _LAYOUT[self.data_type]
        if len(registers) != count:
            raise DriverError(f"{self.name}: expected {count} registers, got {len(registers)}")
        words = list(registers) if self.word_order == "big" else list(reversed(registers))
        data = b"".join(_word_bytes(w, self.byte_order) for w in words)
        raw = struct.unpack(">" + code, data)[0]
        return self.to_engineering(raw)

    def encode_registers(self, value: float) -> list[int]:
        """Engineering value -> registers to write; refuses what the type cannot hold."""
        count, code = _LAYOUT[self.data_type]
        raw = self.to_raw(float(value))
        if not math.isfinite(raw):
            raise DriverError(f"{self.name}: {value!r} is not a finite number")
        if code not in "fd":
            rounded = round(raw)
            if abs(rounded - raw) > 1e-6 * max(1.0, abs(raw)):
                raise DriverError(f"{self.name}: {value!r} is not a whole number of raw units")
            raw = rounded
        try:
            data = struct.pack(">" + code, raw)
        except (struct.error, OverflowError):
            raise DriverError(f"{self.name}: {value!r} does not fit a {self.data_type}") from None
        words = [_word_value(data[i : i + 2], self.byte_order) for i in range(0, len(data), 2)]
        return words if self.word_order == "big" else list(reversed(words))


def _word_bytes(word: int, order: str) -> bytes:
    data = word.to_bytes(2, "big")
    return data if order == "big" else data[::-1]


def _word_value(data: bytes, order: str) -> int:
    return int.from_bytes(data if order == "big" else data[::-1], "big")

