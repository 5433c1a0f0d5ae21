r"""A Super Mario Bros driver that reads the game's memory: data from a player that gets far, for V and M.

The right-biased random player dies at the first goomba or pipe (furthest x ~650-900 of the ~3,161 of 1-1),
so M never sees the rest of the level and a controller has nothing to imitate. This driver runs right
holding B and jumps (right + A + B) when the NES RAM shows, within ``look`` pixels ahead, a solid tile at
Mario's height, a gap in the ground, or an enemy at about Mario's height; once in the air it holds A for at
most ``hold`` steps (a longer press jumps higher) and it lets A go for a step before the next jump, since
the game needs A released between jumps. It reads state no controller sees (positions from RAM, never the
frame): it only gathers the data; the controller learns from the frames' latents alone.

RAM layout (Super Mario Bros, documented by the ROM disassembly and used by gym-super-mario-bros):

- Mario's level x: ``0x6D`` (page) * 256 + ``0x86``; his screen x: ``0x3AD``; his screen y: ``0xCE``, the
  top of a 16 x 32 px box whose lower half small Mario fills, and its page ``0xB5`` (1 on the screen, 0 above
  it, 2 and more below it: falling down a hole); his float state ``0x1D`` (0 on the ground).
- Enemy slots i = 0..4: active flag ``0x0F + i``, level x ``0x6E + i`` * 256 + ``0x87 + i``, screen y
  ``0xCF + i`` (a goomba is drawn in the 16 x 16 px square from x, y + 8) and its page ``0xB6 + i``.
- The screen's left edge in the level: ``0x71A`` (page) * 256 + ``0x71C``.
- The level's metatiles around the screen: ``0x500``, two pages of 13 rows x 16 columns of 16 px, row 0 at
  screen y 32; a non-zero tile is solid enough to jump over or stand on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

TILE = 16
TILE_MAP, TILE_ROWS, TILE_COLUMNS, TILE_TOP = 0x500, 13, 16, 32
SCREEN_BOTTOM = TILE_TOP + TILE_ROWS * TILE
FLOAT_STATE = 0x1D
ENEMY_SLOTS = 5


def level_x(ram: np.ndarray, page: int, x: int) -> int:
    """A level x from its page byte at ``page`` and its in-page byte at ``x``."""
    return int(ram[page]) * 256 + int(ram[x])


def mario_position(ram: np.ndarray) -> tuple[int, int]:
    """Mario's level x (pixels from the level start, the x gym-super-mario-bros reports) and screen y."""
    return level_x(ram, 0x6D, 0x86), int(ram[0xCE])


SCREEN_WIDTH, SCREEN_HEIGHT = 256, 240
"""The NES frame gym-super-mario-bros returns, before any resize."""


def screen_centre(ram: np.ndarray) -> tuple[float, float] | None:
    """Where small Mario's sprite is centred in the NES frame (x, y pixels of the 256 x 240 screen); None when
    he is above or below the screen (``0xCE`` alone would wrap around)."""
    if ram[0xB5] != 1:
        return None
    return int(ram[0x3AD]) + TILE / 2, int(ram[0xCE]) + 1.5 * TILE


def enemy_centres(ram: np.ndarray) -> np.ndarray:
    """float ``[ENEMY_SLOTS, 2]``: where each enemy slot's sprite is centred in the NES frame (x, y pixels),
    NaN for an empty slot or an enemy off the screen. While the screen scrolls the sprites are drawn a few
    pixels right of this (the frame was drawn with the scroll of the frame before)."""
    left = level_x(ram, 0x71A, 0x71C)
    centres = np.full((ENEMY_SLOTS, 2), np.nan)
    for slot in range(ENEMY_SLOTS):
        x = level_x(ram, 0x6E + slot, 0x87 + slot) - left + TILE / 2
        if ram[0x0F + slot] and ram[0xB6 + slot] == 1 and 0 <= x < SCREEN_WIDTH:
            centres[slot] = x, int(ram[0xCF + slot]) + TILE
    return centres


def on_ground(ram: np.ndarray) -> bool:
    return ram[FLOAT_STATE] == 0


def tile_address(x: int, y: int) -> int:
    """The RAM address of the metatile at level x and screen y (``TILE_TOP <= y < SCREEN_BOTTOM``)."""
    page, column, row = (x // 256) % 2, (x % 256) // TILE, (y - TILE_TOP) // TILE
    return TILE_MAP + page * TILE_ROWS * TILE_COLUMNS + row * TILE_COLUMNS + column


def solid(ram: np.ndarray, x: int, y: int) -> bool:
    """Whether the metatile at level x and screen y holds something (False above and below the map)."""
    return TILE_TOP <= y < SCREEN_BOTTOM and bool(ram[tile_address(x, y)])


def danger_ahead(ram: np.ndarray, look: int) -> bool:
    """A wall at Mario's height, a gap in the ground or an enemy at about his height, within ``look`` px."""
    x, y = mario_position(ram)
    front = x + TILE // 2
    for dx in range(TILE // 2, look, TILE // 2):
        if solid(ram, front + dx, y) or solid(ram, front + dx, y + TILE // 2):
            return True
    if on_ground(ram):  # in the air, a gap below is where the jump already goes
        for dx in range(TILE // 2, 2 * TILE, TILE // 2):
            if not any(solid(ram, front + dx, row) for row in range(y + TILE, SCREEN_BOTTOM, TILE)):
                return True
    for slot in range(ENEMY_SLOTS):
        if ram[0x0F + slot]:
            enemy_x = level_x(ram, 0x6E + slot, 0x87 + slot)
            if 0 <= enemy_x - x <= look + TILE and abs(int(ram[0xCF + slot]) - y) < 3 * TILE // 2:
                return True
    return False


class MarioExpert:
    """The jumping rule above over a live game's RAM; ``act`` returns True to press A (with right + B)."""

    def __init__(self, ram: Callable[[], np.ndarray], look: int = 40, hold: int = 10):
        self.ram = ram
        self.look = look
        self.hold = hold
        self.reset()

    def reset(self) -> None:
        self.pressed = False
        self.air_steps = 0

    def act(self) -> bool:
        ram = self.ram()
        if on_ground(ram):
            self.air_steps = 0
            self.pressed = not self.pressed and danger_ahead(ram, self.look)
        else:  # in the air: keep A down for a higher jump, up to ``hold`` steps
            self.air_steps += 1
            self.pressed = self.pressed and self.air_steps <= self.hold
        return self.pressed
