"""SAMUNetSlicer: prompt-based segmentation (SAM-UNet, LiteMedSAM) in 3D Slicer.

The widget is thin: it owns the Qt parts (buttons, shortcuts, timers, dialogs) and forwards everything else to
SAMUNetSlicerLib, which talks MRML only. The model never runs on the GUI thread: prompts go to the engine's session
worker, and a Qt timer applies finished results on the main thread.
"""

from __future__ import annotations

import logging
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from samunet_core.runtime import RUNTIME_CHOICES  # stdlib + numpy only: safe before dependencies are installed

POLL_MS = 30


class SAMUNetSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SAMUNet Segment")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = ["Markups", "Segmentations"]
        self.parent.contributors = ["SAMUNetSlicer developers"]
        self.parent.helpText = _(
            "Press Start, then click positive/negative points or a box on a slice in any slice view (Red, Yellow or "
            "Green): the structure is segmented at once into the selected segment, honouring the Segment Editor's "
            "masking settings. Shift held while placing a point gives it the other polarity. Successive clicks "
            "refine the mask. Accept keeps it (one undo step), Clear puts the slices back. Propagate carries the mask "
            "through the volume; Batch applies the prompts to every loaded volume. Keys (only while this module's "
            "panel has the keyboard focus, so Slicer's own keys are never taken): Enter accept, Escape clear.")
        self.parent.acknowledgementText = _(
            "SAM-UNet (arXiv 2408.09886) and LiteMedSAM (bowang-lab MedSAM, CVPR 2024 MedSAM on Laptop).")


@parameterNodeWrapper
class SAMUNetSlicerParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentID: str = ""
    model: str = ""  # a registry name; the widget offers only models whose weights are present
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    runtime: Annotated[str, Choice(list(RUNTIME_CHOICES))] = "auto"  # the image encoder's: samunet_core/runtime.py
    server: str = ""  # compute on: "" this computer, else a `samunet serve` URL (docs/serve.md)
    tokenFile: str = ""  # the file holding that server's token
    correction: Annotated[str, Choice(["replace", "add", "remove"])] = "replace"
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode


class SAMUNetSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Qt only: maps buttons and keys to the Lib's InteractionController and shows its state."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._controller = None
        self._batch = None
        self._shortcuts = []
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._poll)

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

        self.ui.positiveButton.clicked.connect(lambda: self._tool("positive"))
        self.ui.negativeButton.clicked.connect(lambda: self._tool("negative"))
        self.ui.boxButton.clicked.connect(lambda: self._tool("box"))
        self.ui.startButton.clicked.connect(self.onStart)
        self.ui.acceptButton.clicked.connect(lambda: self._call(_("Accept failed."), "accept"))
        self.ui.clearButton.clicked.connect(lambda: self._call(_("Clear failed."), "clear"))
        self.ui.undoButton.clicked.connect(lambda: self._call(_("Undo failed."), "undo"))
        self.ui.undoPromptButton.clicked.connect(lambda: self._call(_("Undo failed."), "remove_last_prompt"))
        for button, direction in ((self.ui.propagateUpButton, "up"), (self.ui.propagateDownButton, "down"),
                                  (self.ui.propagateBothButton, "both")):
            button.clicked.connect(lambda _checked=False, d=direction: self._call(_("Propagation failed."),
                                                                                  "propagate", d))
        self.ui.batchButton.clicked.connect(self.onBatch)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.dependenciesButton.clicked.connect(self.onInstallDependencies)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self._onSegmentSelected)
        self.ui.correctionComboBox.connect("currentTextChanged(QString)", self._onModeChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self._onModelChanged)
        self._fillModels()
        self._installShortcuts()
        self.initializeParameterNode()

    def _fillModels(self) -> None:
        """Every registry model; those without weights disabled, the tooltip saying where the file goes."""
        from SAMUNetSlicerLib.models import model_choices

        combo = self.ui.modelComboBox
        combo.clear()
        for index, choice in enumerate(model_choices()):
            combo.addItem(choice.label, choice.name)
            combo.setItemData(index, choice.tooltip, qt.Qt.ToolTipRole)
            if not choice.enabled:
                combo.model().item(index).setEnabled(False)

    def _installShortcuts(self) -> None:
        """Enter and Escape, only while the module panel has the focus: no application-wide single keys."""
        for key, slot in (("Return", lambda: self._call(_("Accept failed."), "accept")),
                          ("Escape", lambda: self._call(_("Clear failed."), "clear"))):
            shortcut = qt.QShortcut(qt.QKeySequence(key), self.parent)
            shortcut.setContext(qt.Qt.WidgetWithChildrenShortcut)
            shortcut.activated.connect(slot)
            self._shortcuts.append(shortcut)

    def cleanup(self) -> None:
        self.removeObservers()
        self._timer.stop()
        if self._controller is not None:
            self._controller.close()
            self._controller = None
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
        self._shortcuts = []

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)  # the controller drops its own pending work on the same event

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
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
            index = self.ui.modelComboBox.findData(self._parameterNode.model)
            if index >= 0 and self.ui.modelComboBox.model().item(index).isEnabled():
                self.ui.modelComboBox.currentIndex = index
            else:
                self._onModelChanged(self.ui.modelComboBox.currentIndex)

    def _onSegmentSelected(self, segmentID) -> None:
        if self._parameterNode:
            self._parameterNode.segmentation = self.ui.segmentSelector.currentNode()
            self._parameterNode.segmentID = segmentID or ""

    def _onModelChanged(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index) or ""

    def _onModeChanged(self, mode) -> None:
        if self._controller is not None and self._controller.started and mode:
            self._controller.set_mode(mode)

    # -- controller calls -----------------------------------------------------------------------------------------
    def onStart(self) -> None:
        """Bind volume, segment and model; from now on prompts in any slice view update the segment."""
        with slicer.util.tryWithErrorDisplay(_("Could not start segmenting."), waitCursor=True):
            if not self._ensureDependencies():
                return
            if self._controller is None:
                self._controller = self.logic.createController(
                    self._parameterNode, status=self._showStatus,
                    negative_modifier=lambda: bool(qt.QApplication.keyboardModifiers() & qt.Qt.ShiftModifier))
            self.logic.startController(self._controller, self._parameterNode)
            self._allowShiftPlace()
            self._timer.start()
            self._showStatus(_("Segmenting {segment}: place points or a box in any slice view").format(
                segment=self._parameterNode.segmentID))

    def _allowShiftPlace(self) -> None:
        """Slicer places points only on a plain click; in every slice view let Shift-click place our points too (the
        controller then gives that point the other polarity)."""
        from SAMUNetSlicerLib.views import allow_place_with_modifier

        layout = slicer.app.layoutManager()
        for name in layout.sliceViewNames():
            manager = layout.sliceWidget(name).sliceView().displayableManagerByClassName(
                "vtkMRMLMarkupsDisplayableManager")
            if manager is None:
                continue
            for node in (self._controller.positive_node, self._controller.negative_node):
                allow_place_with_modifier(manager, node)

    def _tool(self, tool: str) -> None:
        if self._controller is None or not self._controller.started:
            self.onStart()
        if self._controller is not None and self._controller.started:
            self._controller.set_tool(tool)

    def _call(self, failure: str, method: str, *args) -> None:
        if self._controller is None or not self._controller.started:
            return
        with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
            getattr(self._controller, method)(*args)

    def _showStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text

    def _poll(self) -> None:
        """Qt timer on the main thread: apply finished results (never waits on the model)."""
        if self._controller is not None:
            self._controller.poll()
            self.ui.progressBar.setVisible(self._controller.busy)
            if self._controller.last_latency_ms is not None and not self._controller.busy:
                self.ui.statusLabel.toolTip = _("last update {ms:.0f} ms").format(
                    ms=self._controller.last_latency_ms)
        if self._batch is not None:
            for result in self._batch.apply_ready():
                if result.error:
                    logging.error("SAMUNet batch: %s: %s", result.target.volume_name, result.error)
            done, total, message = self._batch.progress()
            self.ui.progressBar.maximum, self.ui.progressBar.value = total, done
            self.ui.progressBar.show()
            self.ui.statusLabel.text = message
            if self._batch.future is not None and self._batch.future.done() and done >= total:
                self._batch.apply_ready()
                self._batch = None
                self.ui.progressBar.hide()

    def onBatch(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Batch failed."), waitCursor=True):
            if not self._ensureDependencies():
                return
            if self._controller is None or not self._controller.started:
                raise ValueError(_("Press Start and place the prompts first: Batch applies them to every volume."))
            self._batch = self.logic.startBatch(self._parameterNode, self._controller,
                                                propagate=self.ui.batchPropagateCheckBox.checked)
            self._timer.start()

    def onCancel(self) -> None:
        if self._batch is not None:
            self._batch.cancel()

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


class SAMUNetSlicerLogic(ScriptedLoadableModuleLogic):
    """Module logic: parameter node, model loading, dependency installs; the MRML work is in SAMUNetSlicerLib."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._predictors = {}
        self._cache = None

    def getParameterNode(self):
        return SAMUNetSlicerParameterNode(super().getParameterNode())

    def predictor(self, model: str, device: str, runtime: str = "auto", server: str = "", token_file: str = ""):
        """The loaded model (kept per model, device and encoder runtime), or with `server` a client of that
        `samunet serve` (its model decides). The first use of an exported runtime builds its export (tens of
        seconds, once per weights and runtime version; cached on disk)."""
        if server:
            key = ("server", server, token_file)
            if key not in self._predictors:
                from samunet_core.remote import RemoteClient, read_token

                self._predictors[key] = RemoteClient(server, read_token(token_file or None))
            return self._predictors[key]
        key = (model, device, runtime)
        if key not in self._predictors:
            from samunet_core.predictor import load_predictor

            self._predictors[key] = load_predictor(model, device=device, runtime=runtime)
        return self._predictors[key]

    def cache(self):
        if self._cache is None:
            from samunet_core.cache import EmbeddingCache

            self._cache = EmbeddingCache()
        return self._cache

    @staticmethod
    def maskSettings():
        """The Segment Editor's current masking (its parameter node), or safe defaults."""
        from SAMUNetSlicerLib.masking import MaskSettings

        node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentEditorNode")
        return MaskSettings.from_segment_editor_node(node)

    @staticmethod
    def segmentEditorUndo(segmentationNode):
        """The Segment Editor's saveStateForUndo when the editor holds this segmentation (else None, so another
        segmentation's undo history is never touched)."""
        try:
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        except Exception:
            return None
        if editor.segmentationNode() is not segmentationNode:
            return None
        return editor.saveStateForUndo

    def createController(self, parameterNode, status=None, negative_modifier=None, predictor=None):
        """An InteractionController for this scene (usable without the widget, e.g. from the Python console)."""
        from SAMUNetSlicerLib.controller import InteractionController

        p = parameterNode
        predictor = predictor or self.predictor(p.model or None, p.device, p.runtime, p.server, p.tokenFile)
        return InteractionController(slicer.mrmlScene, predictor,
                                     cache=self.cache(), settings=self.maskSettings,
                                     undo_history=self.segmentEditorUndo, negative_modifier=negative_modifier,
                                     status=status)

    def startController(self, controller, parameterNode) -> None:
        """Bind the parameter node's volume, segmentation and segment; prompt nodes are created once per scene."""
        p = parameterNode
        controller.predictor = self.predictor(p.model or None, p.device, p.runtime, p.server, p.tokenFile)
        controller.start(p.inputVolume, p.segmentation, p.segmentID, p.positivePoints, p.negativePoints,
                         mode=p.correction)
        p.positivePoints, p.negativePoints = controller.positive_node, controller.negative_node

    def startBatch(self, parameterNode, controller, propagate: bool = False, predictor=None, volumes=None):
        """The prompts placed since the last Accept, applied to every loaded volume (one new segmentation each)."""
        from SAMUNetSlicerLib.batch import BatchRunner, make_targets

        p = parameterNode
        segment = p.segmentation.GetSegmentation().GetSegment(p.segmentID) if p.segmentation and p.segmentID else None
        name = segment.GetName() if segment is not None else "SAMUNet"
        prompts = controller.prompt_file(name, propagate)
        volumes = volumes or list(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"))
        targets = make_targets(slicer.mrmlScene, volumes, name)
        predictor = predictor or self.predictor(p.model or None, p.device, p.runtime, p.server, p.tokenFile)
        runner = BatchRunner(targets, predictor, prompts,
                             cache=self.cache(), settings=self.maskSettings(), undo_history=self.segmentEditorUndo)
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
    """Runs inside Slicer: the Logic and the Lib's controller, the default model, the sample CT, real assertions."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_box_in_red_view_writes_one_slice_with_undo_and_provenance()

    def test_box_in_red_view_writes_one_slice_with_undo_and_provenance(self):
        import numpy as np
        import SampleData

        from SAMUNetSlicerLib.dependencies import missing
        from SAMUNetSlicerLib.replay import place_box

        if missing():
            self.skipTest("dependencies not installed (module panel > Install dependencies): "
                          + ", ".join(r.name for r in missing()))
        self.delayDisplay("Loading CTChest")
        volume = SampleData.downloadSample("CTChest")
        volume.GetDisplayNode().AutoWindowLevelOff()
        volume.GetDisplayNode().SetWindowLevel(1500, -600)
        logic = SAMUNetSlicerLogic()
        p = logic.getParameterNode()
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        seg.CreateDefaultDisplayNodes()
        p.inputVolume, p.segmentation = volume, seg
        p.segmentID = seg.GetSegmentation().AddEmptySegment("lung")
        p.device = "cpu"
        controller = logic.createController(p)
        try:
            logic.startController(controller, p)
            frame = controller.frame("axial")
            k = frame.n_slices // 2
            rows, cols = frame.slice_shape
            lo, hi = frame.display_to_world(np.array([[k, rows * 0.3, cols * 0.15], [k, rows * 0.7, cols * 0.48]]))
            red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
            red.SetOrientation("Axial")
            red.JumpSliceByOffsetting(*((lo + hi) / 2))
            place_box(controller.set_tool("box"), np.minimum(lo, hi), np.maximum(lo, hi))
            controller.wait(timeout=300)
            self.assertEqual(controller.errors, [])
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, p.segmentID, volume)
            plane = frame.slice_of(mask, k)
            self.assertGreater(plane.sum(), 0.2 * (rows * 0.4) * (cols * 0.33))  # a lung fills much of its box
            self.assertEqual(mask.sum(), plane.sum())  # nothing outside the prompted slice
            controller.accept()
            value = vtk.reference("")
            self.assertTrue(seg.GetSegmentation().GetSegment(p.segmentID).GetTag("SAMUNet.Model", value))
            self.assertEqual(str(value), controller.predictor.model_id)
            controller.undo()
            self.assertEqual(slicer.util.arrayFromSegmentBinaryLabelmap(seg, p.segmentID, volume).sum(), 0)
        finally:
            controller.close()
        self.delayDisplay("Test passed")
