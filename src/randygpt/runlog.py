"""What a training run tells its user while it runs: the log line and its format, a logger that
redraws it in place on a terminal, and the meter behind its figures (the interval's loss and
throughput, the time left, the time elapsed across resumed sessions)."""
import math

__all__ = ["format_duration", "format_rate", "progress_line", "Logger", "Silent", "SILENT", "Meter"]


def format_duration(seconds):
    """Seconds as '4m10s', '1h02m', '37s' (an ETA needs no more precision)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_rate(tok_per_s):
    """Tokens per second as the log line shows them: "12,345 tok/s"."""
    return f"{tok_per_s:,.0f} tok/s"


def progress_line(step, iters, mean_loss, val_loss, lr, best_val, tok_per_s, eta_s, val_bpc=None):
    """The log line printed every log_every iterations. The validation loss (per token, and
    in bits per character when val_bpc is given) and the best one so far appear only on the
    lines of an evaluation (val_loss not None), so a number on a line was always measured at
    that line's iteration."""
    val = "" if val_loss is None else f" | Val {val_loss:.3f}"
    if val_loss is not None and val_bpc is not None:
        val += f" ({val_bpc:.3f} bpc)"
    best = "" if val_loss is None else f" | Best {best_val:.3f}"
    return (f"Iter {step}/{iters} | Loss {mean_loss:.3f}{val} | LR {lr:.1e}{best} | "
            f"{format_rate(tok_per_s)} | ETA {format_duration(eta_s)}")


class Logger:
    """Log lines to a stream: plain lines when it is not a terminal; on a terminal the line is
    redrawn in place with \\r and kept (newline) at each evaluation."""

    def __init__(self, stream):
        self.stream = stream
        try:
            self.tty = stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._open_line = False

    def line(self, text):
        self.end_progress()
        print(text, file=self.stream, flush=True)

    def progress(self, text, keep):
        if self.tty:
            # \033[K clears what a longer previous line left behind.
            self.stream.write("\r" + text + "\033[K")
            if keep:
                self.stream.write("\n")
            self._open_line = not keep
            self.stream.flush()
        else:
            print(text, file=self.stream, flush=True)

    def end_progress(self):
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


class Silent:
    """A stream that drops what is written: the log of ranks other than 0."""

    def write(self, text):
        return len(text)

    def flush(self):
        pass

    def isatty(self):
        return False


SILENT = Silent()


class Meter:
    """Times and losses of a fit: the current log interval's loss sum and step time (what the
    log line reports), and the session's mean step and evaluation times (what the ETA uses,
    so it does not jump when an evaluation lands in an interval)."""

    def __init__(self, step, now, elapsed_before=0.0):
        self.elapsed_before = elapsed_before    # seconds of earlier sessions (a resumed run)
        self.t_start = now
        self.step_time = self.eval_time = 0.0
        self.steps = self.evals = 0
        self.new_interval(step)

    def start(self, now):
        """The first step is about to run: elapsed time counts from here."""
        self.t_start = now

    def new_interval(self, step):
        self.mark_step = step
        self.interval_loss = 0.0
        self.interval_time = 0.0

    def step_done(self, loss, seconds):
        self.interval_loss += loss
        self.interval_time += seconds
        self.step_time += seconds
        self.steps += 1

    def eval_done(self, seconds):
        self.eval_time += seconds
        self.evals += 1

    def eta(self, steps_left, evals_left):
        if self.steps == 0:
            return math.nan
        per_eval = self.eval_time / self.evals if self.evals else 0.0
        return steps_left * self.step_time / self.steps + evals_left * per_eval

    def elapsed(self, now):
        return self.elapsed_before + now - self.t_start
