"""Widgets of the chat screen."""

from rtlocal.tui.widgets.chat_log import AnswerView, ChatLog, UserMessage
from rtlocal.tui.widgets.control_panel import ControlPanel, ThresholdRow
from rtlocal.tui.widgets.decision import DecisionView
from rtlocal.tui.widgets.status_bar import StatusBar

__all__ = ["AnswerView", "ChatLog", "ControlPanel", "DecisionView", "StatusBar", "ThresholdRow", "UserMessage"]
