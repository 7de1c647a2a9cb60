package com.kckeras.demo

import android.Manifest
import android.content.pm.PackageManager
import android.os.Bundle
import android.util.Log
import android.widget.Button
import android.widget.CheckBox
import android.widget.TextView
import androidx.activity.result.contract.ActivityResultContracts
import androidx.appcompat.app.AppCompatActivity
import androidx.camera.core.CameraSelector
import androidx.camera.core.Preview
import androidx.camera.lifecycle.ProcessCameraProvider
import androidx.camera.view.PreviewView
import androidx.core.content.ContextCompat
import com.kckeras.demo.processing.ModelMetadataException
import java.util.Locale
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors

/**
 * Shows the camera preview; "Classify" runs the student on the current
 * frame and lists the top-5 classes with their verticals and the latency.
 */
class MainActivity : AppCompatActivity() {
    private lateinit var previewView: PreviewView
    private lateinit var modelInfo: TextView
    private lateinit var results: TextView
    private lateinit var latency: TextView
    private lateinit var classifyButton: Button
    private lateinit var benchmarkButton: Button
    private lateinit var invert: CheckBox

    // The interpreter runs on one background thread, never the UI thread.
    private val worker: ExecutorService = Executors.newSingleThreadExecutor()
    private var classifier: StudentClassifier? = null

    private val cameraPermission = registerForActivityResult(ActivityResultContracts.RequestPermission()) { granted ->
        if (granted) startCamera() else showError(getString(R.string.camera_denied))
    }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        previewView = findViewById(R.id.preview)
        modelInfo = findViewById(R.id.model_info)
        results = findViewById(R.id.results)
        latency = findViewById(R.id.latency)
        classifyButton = findViewById(R.id.classify)
        benchmarkButton = findViewById(R.id.benchmark)
        invert = findViewById(R.id.invert)

        classifyButton.setOnClickListener { classifyFrame() }
        benchmarkButton.setOnClickListener { runBenchmark() }
        loadModel()
        if (ContextCompat.checkSelfPermission(this, Manifest.permission.CAMERA) == PackageManager.PERMISSION_GRANTED) {
            startCamera()
        } else {
            cameraPermission.launch(Manifest.permission.CAMERA)
        }
    }

    override fun onDestroy() {
        worker.execute { classifier?.close() }
        worker.shutdown()
        super.onDestroy()
    }

    private fun loadModel() {
        worker.execute {
            try {
                val loaded = StudentClassifier(this)
                classifier = loaded
                val metadata = loaded.metadata
                runOnUiThread {
                    modelInfo.text = String.format(
                        Locale.US, "%s (%s): %d classes in %d verticals, input %dx%dx%d",
                        metadata.name, metadata.mode, metadata.labels.size, metadata.verticalNames.size,
                        metadata.width, metadata.height, metadata.channels
                    )
                    classifyButton.isEnabled = true
                    benchmarkButton.isEnabled = true
                }
            } catch (error: ModelMetadataException) {
                Log.e(TAG, "model could not be loaded", error)
                runOnUiThread { showError(error.message ?: "The model could not be loaded.") }
            } catch (error: IllegalArgumentException) {
                // The interpreter rejects a corrupt or unsupported model this way.
                Log.e(TAG, "model could not be loaded", error)
                runOnUiThread { showError("The model could not be loaded: ${error.message}") }
            }
        }
    }

    private fun startCamera() {
        val providerFuture = ProcessCameraProvider.getInstance(this)
        providerFuture.addListener({
            val provider = providerFuture.get()
            val preview = Preview.Builder().build().also { it.setSurfaceProvider(previewView.surfaceProvider) }
            try {
                provider.unbindAll()
                provider.bindToLifecycle(this, CameraSelector.DEFAULT_BACK_CAMERA, preview)
            } catch (error: IllegalArgumentException) {
                Log.e(TAG, "no back camera", error)
                showError("No back camera was found on this device.")
            }
        }, ContextCompat.getMainExecutor(this))
    }

    private fun classifyFrame() {
        val model = classifier ?: return
        val frame = previewView.bitmap
        if (frame == null) {
            showError("The camera has not delivered a frame yet; try again in a moment.")
            return
        }
        val inverted = invert.isChecked
        worker.execute {
            val result = model.classify(frame, inverted)
            runOnUiThread {
                results.text = result.top5.mapIndexed { rank, prediction ->
                    String.format(
                        Locale.US, "%d. %-16s %-12s %.3f",
                        rank + 1, prediction.label, prediction.vertical, prediction.score
                    )
                }.joinToString("\n")
                latency.text = String.format(Locale.US, "Inference: %.2f ms (LiteRT, CPU)", result.latencyMs)
            }
        }
    }

    private fun runBenchmark() {
        val model = classifier ?: return
        benchmarkButton.isEnabled = false
        latency.text = "Benchmarking…"
        worker.execute {
            val medianMs = model.benchmark()
            runOnUiThread {
                latency.text = String.format(Locale.US, "Benchmark: median %.3f ms per inference (50 runs)", medianMs)
                benchmarkButton.isEnabled = true
            }
        }
    }

    private fun showError(message: String) {
        results.text = message
    }

    private companion object {
        const val TAG = "KcDemo"
    }
}
