"""The explorer machinery: one figure drawn once, updated in place, shown as a clickable PNG widget.

An explorer owns a matplotlib figure on an Agg canvas (no pyplot, no display needed). ``set(**changes)``
recomputes only what the changed controls need and updates the data of the existing artists;
``click_pixel(x, y)`` maps a click on the rendered PNG to the axes under it. ``show(interactive)``
displays the PNG only (headless runs) or the live widget (ipywidgets + ipyevents) followed by a static
snapshot that a reopened notebook keeps; while the live widget is on the page it hides the snapshot.
"""

from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass, field

import numpy as np
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SNAPSHOT_NOTE = "Static image of the explorer's last state: run this cell to explore it live."
# while the live widget is on the page, the note and snapshot outputs that follow it are hidden
_HIDE_SNAPSHOT = (
    "<style>.jp-OutputArea-child:has(.nbs-explorer) ~ .jp-OutputArea-child {display: none;}"
    " .nbs-explorer img {cursor: crosshair;}</style>"
)
# the note (a trusted HTML output) hides the widget output before it unless a live explorer is in it: in a
# reopened notebook that output can only say "Error displaying widget: model not found"
_NOTE_HTML = (
    "<style>.jp-OutputArea-child:has(+ .jp-OutputArea-child .nbs-explorer-note):not(:has(.nbs-explorer))"
    " {display: none;}</style><p class='nbs-explorer-note'><em>{note}</em></p>"
)


@dataclass
class Control:
    """One control: ``kind`` is ``int`` (slider over ``options = (lo, hi)``), ``float`` (slider over
    ``(lo, hi, step)``) or ``choice`` (dropdown over ``options``)."""

    name: str
    kind: str
    options: tuple
    label: str = ""

    def build(self, value):
        import ipywidgets as w

        label = self.label or self.name
        if self.kind == "int":
            lo, hi = self.options
            return w.IntSlider(value=value, min=lo, max=hi, description=label, continuous_update=False)
        if self.kind == "float":
            lo, hi, step = self.options
            return w.FloatSlider(value=value, min=lo, max=hi, step=step, description=label, continuous_update=False)
        if self.kind == "choice":
            return w.Dropdown(options=list(self.options), value=value, description=label)
        raise ValueError(f"unknown control kind {self.kind!r}: int | float | choice")


@dataclass
class Timing:
    """Seconds spent by the last update (``compute``: the analysis, ``draw``: rendering the PNG)."""

    compute: float = 0.0
    draw: float = 0.0
    history: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.compute + self.draw


class Explorer:
    """Base class. Subclasses set ``controls`` and ``state``, build their artists in ``__init__`` (after
    ``super().__init__``), and implement ``_update(changed)`` and, when clicks pick something,
    ``on_click(ax_index, y, x)`` with data coordinates of ``self.click_axes[ax_index]``."""

    def __init__(self, figsize=(10.0, 3.4), dpi: int = 100):
        self.fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
        FigureCanvasAgg(self.fig)
        self.controls: list[Control] = []
        self.state: dict = {}
        self.click_axes: list = []
        self.status = ""
        self.timing = Timing()
        self._png: bytes | None = None
        self._image = self._status = self._snapshot = None

    @property
    def figure(self) -> Figure:
        return self.fig

    # ------------------------------------------------------------------------------------ updating
    def _freeze_layout(self) -> None:
        """Lay the figure out once and keep the axes where they are (clicks map to fixed places)."""
        with rc_context({"image.interpolation": "nearest"}):
            self.fig.canvas.draw()
        self.fig.set_layout_engine("none")

    def set(self, **changes) -> float:
        """Change controls (names of ``self.controls``) and redraw; returns the seconds it took."""
        known = {c.name for c in self.controls}
        bad = sorted(set(changes) - known)
        if bad:
            raise ValueError(f"unknown control {', '.join(bad)}: this explorer has {', '.join(sorted(known))}")
        changed = {k for k, v in changes.items() if self.state.get(k) != v}
        self.state.update(changes)
        return self._refresh(changed)

    def click_pixel(self, x: float, y: float) -> bool:
        """A click at pixel ``(x, y)`` of the PNG (origin top left): the clicked axes' ``on_click``;
        False when it hit none of ``click_axes``."""
        dx, dy = x, self.fig.bbox.height - y
        for i, ax in enumerate(self.click_axes):
            if ax.bbox.contains(dx, dy):
                cx, cy = ax.transData.inverted().transform((dx, dy))
                t0 = time.perf_counter()
                self.on_click(i, float(cy), float(cx))
                self.timing.compute = time.perf_counter() - t0
                self._render()
                return True
        return False

    def axes_pixel(self, ax_index: int, y: float, x: float) -> tuple[float, float]:
        """PNG pixel ``(x, y)`` (origin top left) of data point ``(y, x)`` of ``click_axes[ax_index]``
        (the inverse of :meth:`click_pixel`, for tests and the browser test)."""
        dx, dy = self.click_axes[ax_index].transData.transform((x, y))
        return float(dx), float(self.fig.bbox.height - dy)

    def on_click(self, ax_index: int, y: float, x: float) -> None:
        """Clicks pick nothing by default."""

    def _update(self, changed: set) -> None:  # pragma: no cover - every subclass implements it
        raise NotImplementedError

    def _refresh(self, changed: set) -> float:
        t0 = time.perf_counter()
        self._update(changed)
        self.timing.compute = time.perf_counter() - t0
        return self._render()

    def _render(self) -> float:
        t0 = time.perf_counter()
        buf = io.BytesIO()
        with rc_context({"image.interpolation": "nearest"}):  # images drawn as pixels: fast and exact
            self.fig.canvas.print_png(buf, pil_kwargs={"compress_level": 1})
        self._png = buf.getvalue()
        self.timing.draw = time.perf_counter() - t0
        self.timing.history.append(self.timing.total)
        self._push()
        return self.timing.total

    def png(self) -> bytes:
        """The current state as PNG bytes (figure pixels, no tight cropping: clicks map onto it)."""
        if self._png is None:
            self._render()
        return self._png

    def pixels(self) -> np.ndarray:
        """The current state as an RGBA array ``[H, W, 4]`` (uint8)."""
        with rc_context({"image.interpolation": "nearest"}):
            self.fig.canvas.draw()
        return np.asarray(self.fig.canvas.buffer_rgba()).copy()

    # ------------------------------------------------------------------------------------ display
    def _status_html(self) -> str:
        ms = 1000 * self.timing.total
        return f"<span>{self.status} &nbsp;·&nbsp; updated in {ms:.0f} ms</span>"

    def _push(self) -> None:
        """Send the new PNG to the live widget and the snapshot, when they exist."""
        if self._image is not None:
            self._image.value = self._png
            self._status.value = self._status_html()
        if self._snapshot is not None:
            self._snapshot.update(self._snapshot_bundle(), raw=True)

    def _snapshot_bundle(self) -> dict:
        return {"image/png": base64.b64encode(self.png()).decode("ascii"), "text/plain": SNAPSHOT_NOTE}

    def widget(self):
        """The live explorer: controls, the clickable image and a status line (needs ipywidgets and
        ipyevents)."""
        import ipywidgets as w
        from ipyevents import Event

        boxes = []
        for c in self.controls:
            ctl = c.build(self.state[c.name])
            ctl.observe(lambda ch, name=c.name: self._guarded(self.set, **{name: ch["new"]}), names="value")
            boxes.append(ctl)
        width = int(round(self.fig.bbox.width))
        size = w.Layout(width=f"{width}px", max_width="100%", height="auto")  # shrinks to narrow pages
        self._image = w.Image(value=self.png(), format="png", layout=size)
        self._status = w.HTML(self._status_html())
        events = Event(source=self._image, watched_events=["click"])
        events.on_dom_event(lambda event: self._guarded(self._on_dom_click, event))
        self._events = events  # keep the listener alive
        controls = w.HBox(boxes, layout=w.Layout(flex_flow="row wrap"))
        box = w.VBox([w.HTML(_HIDE_SNAPSHOT), controls, self._image, self._status], layout=w.Layout(overflow="hidden"))
        box.add_class("nbs-explorer")
        return box

    def _guarded(self, fn, *args, **kwargs) -> None:
        """Run a widget callback; an error goes to the status line instead of the log console."""
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - shown to the user, the explorer stays usable
            if self._status is not None:
                self._status.value = f"<span style='color: crimson'>{html.escape(f'{type(e).__name__}: {e}')}</span>"

    def _on_dom_click(self, event: dict) -> None:
        """ipyevents click -> PNG pixel: ``dataX``/``dataY`` are already in the image's own pixels."""
        if "dataX" in event:
            x, y = event["dataX"], event["dataY"]
        else:
            scale = self.fig.bbox.width / max(1.0, float(event.get("boundingRectWidth", self.fig.bbox.width)))
            x, y = event["relativeX"] * scale, event["relativeY"] * scale
        self.click_pixel(float(x), float(y))

    def show(self, interactive: bool = False, save_as: str | None = None):
        """Display the explorer: the PNG alone, or (``interactive``) the live widget followed by a static
        snapshot of its last state. ``save_as``: also save the figure (PNG + PDF) into the run folder."""
        from IPython.display import Image, display

        if save_as:
            from nbsupport.notebook import viz

            viz.save_figure(self.fig, save_as)
        if not interactive:
            display(Image(data=self.png(), format="png"))
            return self
        display(self.widget())
        display({"text/html": _NOTE_HTML.replace("{note}", SNAPSHOT_NOTE), "text/plain": SNAPSHOT_NOTE}, raw=True)
        self._snapshot = display(self._snapshot_bundle(), raw=True, display_id=True)
        return self


def image_axes(ax, title: str | None = None) -> None:
    """No ticks, no grid, optional title."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if title:
        ax.set_title(title, fontsize=9)
