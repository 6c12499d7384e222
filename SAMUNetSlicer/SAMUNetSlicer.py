"""SAMUNetSlicer: prompt-based segmentation (SAM-UNet, LiteMedSAM) in 3D Slicer.

The widget is thin: it owns the Qt parts (buttons, shortcuts, timers, dialogs) and forwards everything else to
SAMUNetSlicerLib, which talks MRML only. The model never runs on the GUI thread: prompts go to the engine's session
worker, and a Qt timer applies finished results on the main thread.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

PROGRESS_DELAY_S = 0.5
POLL_MS = 30


class SAMUNetSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SAMUNet Segment")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = ["Markups", "Segmentations"]
        self.parent.contributors = ["SAMUNetSlicer developers"]
        self.parent.helpText = _(
            "Click positive/negative points or draw a box on a slice: the structure is segmented at once into the "
            "selected segment, honouring the Segment Editor's masking settings. Shift-click places a negative point. "
            "Shortcuts: A positive, S negative, B box, Enter accept, Esc clear, Z undo. Propagate carries the mask "
            "through the volume; Batch applies the prompts to every loaded volume.")
        self.parent.acknowledgementText = _(
            "SAM-UNet (arXiv 2408.09886) and LiteMedSAM (bowang-lab MedSAM, CVPR 2024 MedSAM on Laptop).")


@parameterNodeWrapper
class SAMUNetSlicerParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentID: str = ""
    model: Annotated[str, Choice(["litemedsam_clicks", "litemedsam", "samunet_res34", "samunet_res50"])] = (
        "litemedsam_clicks")
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    correction: Annotated[str, Choice(["replace", "add", "remove"])] = "replace"
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    box: vtkMRMLMarkupsROINode


class SAMUNetSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._segmenter = None
        self._observer = None
        self._pending = []  # (future, on_done) pairs checked by the timer
        self._pendingSince = None
        self._batch = None
        self._shortcuts = []
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._checkPending)

    # -- setup ----------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAMUNetSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SAMUNetSlicerLogic()
        self.ui.progressBar.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.positiveButton.clicked.connect(lambda: self._place("positivePoints"))
        self.ui.negativeButton.clicked.connect(lambda: self._place("negativePoints"))
        self.ui.boxButton.clicked.connect(lambda: self._place("box"))
        self.ui.startButton.clicked.connect(self.onStart)
        self.ui.acceptButton.clicked.connect(self.onAccept)
        self.ui.clearButton.clicked.connect(self.onClear)
        self.ui.undoButton.clicked.connect(self.onUndo)
        self.ui.undoPromptButton.clicked.connect(self.onUndoPrompt)
        self.ui.propagateUpButton.clicked.connect(lambda: self.onPropagate("up"))
        self.ui.propagateDownButton.clicked.connect(lambda: self.onPropagate("down"))
        self.ui.propagateBothButton.clicked.connect(lambda: self.onPropagate("both"))
        self.ui.batchButton.clicked.connect(self.onBatch)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.dependenciesButton.clicked.connect(self.onInstallDependencies)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self._onSegmentSelected)
        self._installShortcuts()
        self.initializeParameterNode()

    def _installShortcuts(self) -> None:
        keys = {"a": lambda: self._place("positivePoints"), "s": lambda: self._place("negativePoints"),
                "b": lambda: self._place("box"), "Return": self.onAccept, "Escape": self.onClear, "z": self.onUndo}
        for key, slot in keys.items():
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.setContext(qt.Qt.ApplicationShortcut)
            shortcut.activated.connect(slot)
            shortcut.setEnabled(False)  # only while this module is shown
            self._shortcuts.append(shortcut)

    def cleanup(self) -> None:
        self.removeObservers()
        self._stopSegmenter()
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
        self._shortcuts = []

    def enter(self) -> None:
        self.initializeParameterNode()
        for shortcut in self._shortcuts:
            shortcut.setEnabled(True)

    def exit(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.setEnabled(False)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self._stopSegmenter()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self.logic.ensurePromptNodes(self._parameterNode)
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            if self._parameterNode.segmentation:
                self.ui.segmentSelector.setCurrentNode(self._parameterNode.segmentation)
                if self._parameterNode.segmentID:
                    self.ui.segmentSelector.setCurrentSegmentID(self._parameterNode.segmentID)

    def _onSegmentSelected(self, segmentID) -> None:
        if self._parameterNode:
            self._parameterNode.segmentation = self.ui.segmentSelector.currentNode()
            self._parameterNode.segmentID = segmentID or ""

    # -- tools ----------------------------------------------------------------------------------------------------
    def _place(self, role: str) -> None:
        node = getattr(self._parameterNode, role)
        if node is None:
            return
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
        selection.SetActivePlaceNodeID(node.GetID())
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetPlaceModePersistence(role != "box")
        interaction.SetCurrentInteractionMode(interaction.Place)

    def onStart(self) -> None:
        """Bind volume, segment, model and view orientation; from now on prompts update the segment."""
        with slicer.util.tryWithErrorDisplay(_("Could not start segmenting."), waitCursor=True):
            if not self._ensureDependencies():
                return
            self._stopSegmenter()
            p = self._parameterNode
            axis = self.logic.viewAxis(p.inputVolume)
            self._segmenter = self.logic.createSegmenter(p, axis)
            from SAMUNetSlicerLib.prompts import PromptObserver

            self._observer = PromptObserver(self._onPromptsChanged, p.positivePoints, p.negativePoints, p.box)
            self.ui.statusLabel.text = _("Segmenting {segment} on {axis} slices").format(segment=p.segmentID,
                                                                                          axis=axis)

    def _onPromptsChanged(self) -> None:
        if self._segmenter is None:
            return
        modifiers = qt.QApplication.keyboardModifiers()
        if modifiers & qt.Qt.ShiftModifier and self._observer.move_last_point("positive", "negative"):
            return  # the move fires its own events
        try:
            futures = self._segmenter.prompts_changed(self._observer.read())
        except Exception as exc:
            slicer.util.errorDisplay(str(exc))
            return
        for future in futures:
            self._watch(future, self._segmenter.apply)

    def onAccept(self) -> None:
        if self._segmenter is not None:
            with slicer.util.tryWithErrorDisplay(_("Accept failed."), waitCursor=True):
                self._segmenter.accept()
                self._clearPrompts()

    def onClear(self) -> None:
        if self._segmenter is not None:
            self._segmenter.clear()
            self._clearPrompts()

    def onUndo(self) -> None:
        if self._segmenter is not None:
            with slicer.util.tryWithErrorDisplay(_("Undo failed."), waitCursor=True):
                self._segmenter.undo()
                self._clearPrompts()

    def onUndoPrompt(self) -> None:
        if self._observer is not None:
            self._observer.remove_last_point()

    def _clearPrompts(self) -> None:
        if self._observer is not None:
            segmenter, self._segmenter = self._segmenter, None  # removing markups must not re-segment
            self._observer.clear()
            self._segmenter = segmenter

    def onPropagate(self, direction: str) -> None:
        if self._segmenter is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Propagation failed."), waitCursor=True):
            import threading

            self._cancel = threading.Event()
            self._watch(self._segmenter.propagate(direction, cancel=self._cancel), self._segmenter.apply_propagation)

    def onBatch(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Batch failed."), waitCursor=True):
            if not self._ensureDependencies():
                return
            self._batch = self.logic.startBatch(self._parameterNode, propagate=self.ui.batchPropagateCheckBox.checked)
            self._watch(self._batch.future, lambda _count: self._batch.apply_ready())

    def onCancel(self) -> None:
        if getattr(self, "_cancel", None) is not None:
            self._cancel.set()
        if self._batch is not None:
            self._batch.cancel()

    # -- results back on the main thread --------------------------------------------------------------------------
    def _watch(self, future, onDone) -> None:
        self._pending.append((future, onDone))
        if self._pendingSince is None:
            self._pendingSince = time.monotonic()
        self._timer.start()

    def _checkPending(self) -> None:
        """Qt timer on the main thread: apply finished futures; never waits on one."""
        if self._batch is not None:
            self._batch.apply_ready()
            done, total, message = self._batch.progress()
            self.ui.progressBar.maximum, self.ui.progressBar.value = total, done
            self.ui.statusLabel.text = message
        still = []
        for future, onDone in self._pending:
            if not future.done():
                still.append((future, onDone))
                continue
            if future.cancelled():
                continue
            exc = future.exception()
            if exc is not None:
                slicer.util.errorDisplay(_("Segmentation failed: {error}").format(error=exc))
                continue
            try:
                onDone(future.result())
            except Exception as error:
                logging.exception("applying a result failed")
                slicer.util.errorDisplay(str(error))
        self._pending = still
        if still and time.monotonic() - self._pendingSince > PROGRESS_DELAY_S:
            self.ui.progressBar.show()
        if not still:
            self._pendingSince = None
            self.ui.progressBar.hide()
            self._timer.stop()
            if self._segmenter is not None and self._segmenter.last_latency_ms is not None:
                self.ui.statusLabel.text = _("Updated in {ms:.0f} ms").format(ms=self._segmenter.last_latency_ms)

    # -- dependencies ---------------------------------------------------------------------------------------------
    def _ensureDependencies(self) -> bool:
        from SAMUNetSlicerLib.dependencies import missing

        if not missing():
            return True
        return self.onInstallDependencies()

    def onInstallDependencies(self) -> bool:
        from SAMUNetSlicerLib.dependencies import missing

        needed = missing()
        if not needed:
            slicer.util.infoDisplay(_("All dependencies are installed."))
            return True
        names = ", ".join(r.name for r in needed)
        if not slicer.util.confirmOkCancelDisplay(
                _("SAMUNetSlicer needs: {names}. Install them now? torch comes from the PyTorch extension.")
                .format(names=names)):
            return False
        with slicer.util.WaitCursor():
            self.logic.installRequirements(needed)
        return not missing()

    def _stopSegmenter(self) -> None:
        if self._observer is not None:
            self._observer.remove()
            self._observer = None
        if self._segmenter is not None:
            self._segmenter.close()
            self._segmenter = None


class SAMUNetSlicerLogic(ScriptedLoadableModuleLogic):
    """Module logic: parameter node, model loading, dependency installs; the MRML work is in SAMUNetSlicerLib."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._predictors = {}
        self._cache = None

    def getParameterNode(self):
        return SAMUNetSlicerParameterNode(super().getParameterNode())

    def ensurePromptNodes(self, parameterNode) -> None:
        """Create the prompt markups once per scene (saved with it), coloured green/red/yellow."""
        for role, cls, name, color in (("positivePoints", "vtkMRMLMarkupsFiducialNode", "SAMUNet +", (0, 1, 0)),
                                       ("negativePoints", "vtkMRMLMarkupsFiducialNode", "SAMUNet -", (1, 0, 0)),
                                       ("box", "vtkMRMLMarkupsROINode", "SAMUNet box", (1, 1, 0))):
            if getattr(parameterNode, role) is None:
                node = slicer.mrmlScene.AddNewNodeByClass(cls, name)
                node.CreateDefaultDisplayNodes()
                node.GetDisplayNode().SetSelectedColor(*color)
                setattr(parameterNode, role, node)

    def predictor(self, model: str, device: str):
        key = (model, device)
        if key not in self._predictors:
            from samunet_core.predictor import load_predictor

            self._predictors[key] = load_predictor(model, device=device)
        return self._predictors[key]

    def cache(self):
        if self._cache is None:
            from samunet_core.cache import EmbeddingCache

            self._cache = EmbeddingCache()
        return self._cache

    @staticmethod
    def viewAxis(volumeNode) -> str:
        """Orientation of the Red view, or axial."""
        from SAMUNetSlicerLib.geometry import view_axis

        layout = slicer.app.layoutManager() if hasattr(slicer, "app") else None
        if layout is None:
            return "axial"
        sliceNode = layout.sliceWidget("Red").mrmlSliceNode()
        return view_axis(sliceNode)

    @staticmethod
    def maskSettings():
        """The Segment Editor's current masking (its parameter node), or safe defaults."""
        from SAMUNetSlicerLib.masking import MaskSettings

        node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentEditorNode")
        return MaskSettings.from_segment_editor_node(node)

    @staticmethod
    def segmentEditorUndoHook():
        """Segment Editor widget's saveStateForUndo when the Segment Editor module is loaded."""
        try:
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            return editor.saveStateForUndo
        except Exception:
            return None

    def createSegmenter(self, parameterNode, axis: str = "axial", predictor=None):
        from samunet_core.errors import InputError
        from SAMUNetSlicerLib.interactive import CorrectionMode, InteractiveSegmenter

        p = parameterNode
        if p.inputVolume is None or p.segmentation is None or not p.segmentID:
            raise InputError("choose a volume, a segmentation and a segment first")
        return InteractiveSegmenter(
            p.inputVolume, p.segmentation, p.segmentID, predictor or self.predictor(p.model, p.device), axis=axis,
            cache=self.cache(), settings=self.maskSettings, save_state_for_undo=self.segmentEditorUndoHook(),
            correction=CorrectionMode(p.correction))

    def startBatch(self, parameterNode, propagate: bool = False, predictor=None, volumes=None):
        from SAMUNetSlicerLib.batch import BatchRunner, make_targets
        from SAMUNetSlicerLib.prompts import read_prompts

        p = parameterNode
        volumes = volumes or list(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"))
        prompts = read_prompts(p.positivePoints, p.negativePoints, p.box)
        targets = make_targets(slicer.mrmlScene, volumes, p.segmentID or "SAMUNet")
        runner = BatchRunner(targets, predictor or self.predictor(p.model, p.device), prompts, propagate=propagate,
                             cache=self.cache(), settings=self.maskSettings())
        runner.start()
        return runner

    @staticmethod
    def installRequirements(requirements) -> None:
        """Install after the user agreed: torch through PyTorchUtils, the rest through Slicer's pip helpers."""
        for requirement in requirements:
            if requirement.via_pytorch_extension:
                try:
                    import PyTorchUtils
                except ImportError as exc:
                    raise RuntimeError("install the PyTorch extension from the Extensions Manager first") from exc
                PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
                continue
            packaging = getattr(slicer, "packaging", None)
            if packaging is not None and hasattr(packaging, "pip_ensure") and not requirement.pip_args:
                packaging.pip_ensure([requirement.name])
            else:
                slicer.util.pip_install(" ".join((*requirement.pip_args, requirement.name)))


class SAMUNetSlicerTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: the same Logic and Lib, real model, real sample CT, real assertions."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_box_prompt_writes_one_slice_with_undo_and_provenance()

    def test_box_prompt_writes_one_slice_with_undo_and_provenance(self):
        import numpy as np
        import SampleData

        from SAMUNetSlicerLib.dependencies import missing
        from SAMUNetSlicerLib.prompts import read_prompts

        if missing():
            self.fail("install the dependencies first (module panel > Install dependencies): "
                      + ", ".join(r.name for r in missing()))
        self.delayDisplay("Loading CTChest")
        volume = SampleData.downloadSample("CTChest")
        volume.GetDisplayNode().AutoWindowLevelOff()
        volume.GetDisplayNode().SetWindowLevel(1500, -600)
        logic = SAMUNetSlicerLogic()
        p = logic.getParameterNode()
        logic.ensurePromptNodes(p)
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        seg.CreateDefaultDisplayNodes()
        p.inputVolume, p.segmentation = volume, seg
        p.segmentID = seg.GetSegmentation().AddEmptySegment("lung")
        p.device = "cpu"
        segmenter = logic.createSegmenter(p, "axial")
        try:
            frame = segmenter.frame
            k = frame.n_slices // 2
            rows, cols = frame.slice_shape
            corners = frame.display_to_world(np.array([[k, rows * 0.3, cols * 0.15], [k, rows * 0.7, cols * 0.48]]))
            p.box.SetCenterWorld(*corners.mean(0))
            p.box.SetSizeWorld(*(np.abs(corners[1] - corners[0]) + [0, 0, 1]))
            futures = segmenter.prompts_changed(read_prompts(None, None, p.box))
            self.assertEqual(len(futures), 1)
            self.assertTrue(segmenter.apply(futures[0].result(timeout=300)))
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, p.segmentID, volume)
            plane = frame.slice_of(mask, k)
            self.assertGreater(plane.sum(), 100)
            self.assertEqual(mask.sum(), plane.sum())
            segmenter.accept()
            value = vtk.reference("")
            self.assertTrue(seg.GetSegmentation().GetSegment(p.segmentID).GetTag("SAMUNet.Model", value))
            self.assertEqual(str(value), p.model)
            segmenter.undo()
            self.assertEqual(slicer.util.arrayFromSegmentBinaryLabelmap(seg, p.segmentID, volume).sum(), 0)
        finally:
            segmenter.close()
        self.delayDisplay("Test passed")

