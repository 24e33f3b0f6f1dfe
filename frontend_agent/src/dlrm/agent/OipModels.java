package dlrm.agent;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Collection;
import java.util.List;
import java.util.Map;
import org.pytorch.serve.archive.model.ModelNotFoundException;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.wlm.Model;
import org.pytorch.serve.wlm.ModelManager;
import org.pytorch.serve.wlm.WorkerState;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * What the Open Inference Protocol's server and model routes answer, the same over REST (the
 * replaced OpenInferenceProtocolRequestHandler) and over the standard gRPC service
 * ({@link StandardInferenceService}).
 */
public final class OipModels {
    /** Written into every archive by build_mar.py from the handler's own schema (handler/oip/schema.py). */
    public static final String METADATA_FILE = "oip-metadata.json";
    public static final String SERVER_NAME = "Torchserve";
    public static final List<String> EXTENSIONS = List.of("binary_tensor_data");

    private static final Logger logger = LoggerFactory.getLogger(OipModels.class);

    /** One tensor of a model's metadata. */
    public record Tensor(String name, String datatype, List<Long> shape) {}

    /**
     * A model's metadata. A model whose archive publishes no tensors (no oip-metadata.json: a
     * co-hosted model not built by build_mar.py) has an empty platform and no tensors, as KServe's
     * own server and TorchServe's gRPC ModelMetadata answer for a model that declares none: the
     * model exists and serves, so "not found" would be wrong.
     */
    public record Metadata(
            String name, List<String> versions, String platform, List<Tensor> inputs, List<Tensor> outputs) {}

    /** The metadata file is there but is not what build_mar.py writes. Its message names no path. */
    public static final class InvalidMetadataException extends Exception {
        private static final long serialVersionUID = 1L;

        InvalidMetadataException(String message) {
            super(message);
        }
    }

    private OipModels() {}

    public static String serverVersion() {
        return ConfigManager.getInstance().getVersion();
    }

    /**
     * Ready: at least one model is registered and every model's default version is ready. With
     * no model (the start-up archive failed to load) nothing can be served, so not ready.
     */
    public static boolean serverReady() {
        Collection<Model> models = ModelManager.getInstance().getDefaultModels().values();
        return !models.isEmpty() && models.stream().allMatch(OipModels::isReady);
    }

    /**
     * Ready: a worker has the model loaded and can take a request. Not TorchServe's "healthy"
     * (its /ping and its own gRPC ModelReady), which counts a worker that died and is restarting
     * as healthy for max_retry_timeout_in_sec.
     */
    public static boolean isReady(Model model) {
        return ModelManager.getInstance().getWorkers(model.getModelVersionName()).stream()
                .anyMatch(worker -> worker.getState() == WorkerState.WORKER_MODEL_LOADED);
    }

    public static Metadata metadata(Model model) throws ModelNotFoundException, InvalidMetadataException {
        String name = model.getModelName();
        List<String> versions = new ArrayList<>();
        for (Map.Entry<String, Model> entry : ModelManager.getInstance().getAllModelVersions(name)) {
            versions.add(entry.getKey());
        }
        Path file = model.getModelDir().toPath().resolve(METADATA_FILE);
        if (!Files.isRegularFile(file)) {
            return new Metadata(name, versions, "", List.of(), List.of());
        }
        try {
            JsonObject tensors =
                    JsonParser.parseString(Files.readString(file, StandardCharsets.UTF_8)).getAsJsonObject();
            return new Metadata(
                    name,
                    versions,
                    tensors.get("platform").getAsString(),
                    tensors(tensors.getAsJsonArray("inputs")),
                    tensors(tensors.getAsJsonArray("outputs")));
        } catch (IOException | RuntimeException e) { // gson's for malformed JSON, a missing key or a wrong type
            // The path and the parser's detail go to the server's log only: clients get no filesystem path.
            logger.error("unreadable {} of model {}: {}", METADATA_FILE, name, file, e);
            throw new InvalidMetadataException(
                    "the archive of model " + name + " has an unreadable " + METADATA_FILE
                            + " (not as build_mar.py writes it)");
        }
    }

    private static List<Tensor> tensors(JsonArray described) {
        List<Tensor> tensors = new ArrayList<>();
        for (JsonElement element : described) {
            JsonObject tensor = element.getAsJsonObject();
            List<Long> shape = new ArrayList<>();
            for (JsonElement dimension : tensor.getAsJsonArray("shape")) {
                shape.add(dimension.getAsLong());
            }
            tensors.add(new Tensor(tensor.get("name").getAsString(), tensor.get("datatype").getAsString(), shape));
        }
        return tensors;
    }

    /** The protocol's REST body of a model's metadata. */
    public static JsonObject toJson(Metadata metadata) {
        JsonObject response = new JsonObject();
        response.addProperty("name", metadata.name());
        JsonArray versions = new JsonArray();
        metadata.versions().forEach(versions::add);
        response.add("versions", versions);
        response.addProperty("platform", metadata.platform());
        response.add("inputs", toJson(metadata.inputs()));
        response.add("outputs", toJson(metadata.outputs()));
        return response;
    }

    private static JsonArray toJson(List<Tensor> tensors) {
        JsonArray array = new JsonArray();
        for (Tensor tensor : tensors) {
            JsonObject object = new JsonObject();
            object.addProperty("name", tensor.name());
            object.addProperty("datatype", tensor.datatype());
            JsonArray shape = new JsonArray();
            tensor.shape().forEach(shape::add);
            object.add("shape", shape);
            array.add(object);
        }
        return array;
    }
}
