package org.pytorch.serve.http.api.rest;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import io.netty.channel.ChannelHandlerContext;
import io.netty.handler.codec.http.FullHttpRequest;
import io.netty.handler.codec.http.HttpMethod;
import io.netty.handler.codec.http.HttpResponseStatus;
import io.netty.handler.codec.http.QueryStringDecoder;
import java.io.File;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.Map;
import org.pytorch.serve.archive.DownloadArchiveException;
import org.pytorch.serve.archive.model.ModelException;
import org.pytorch.serve.archive.model.ModelNotFoundException;
import org.pytorch.serve.archive.model.ModelVersionNotFoundException;
import org.pytorch.serve.archive.workflow.WorkflowException;
import org.pytorch.serve.http.HttpRequestHandlerChain;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.NettyUtils;
import org.pytorch.serve.wlm.Model;
import org.pytorch.serve.wlm.ModelManager;
import org.pytorch.serve.wlm.WorkerInitializationException;
import org.pytorch.serve.wlm.WorkerState;

/**
 * The Open Inference Protocol's REST routes other than inference, in place of TorchServe
 * 0.12.0's class of the same name (loaded by dlrm.agent.OipRoutesAgent).
 *
 * <p>TorchServe's inference handler takes POST /v2/models/{m}/infer before this link of the
 * chain is reached. Kept from TorchServe: GET /v2/health/live and /v2 (server metadata, with
 * its "extensions" key spelled as the protocol spells it). Changed: GET /v2/health/ready, always
 * true in TorchServe (even while every worker is down and restarting), is true while every model's
 * default version is ready. Added: GET /v2/models/{m}[/versions/{v}] (model metadata) and
 * .../ready (model readiness). A model's tensors come from the oip-metadata.json that
 * build_mar.py writes into its archive from the handler's own schema; a model is ready while
 * one of its workers has it loaded. Errors have the protocol's {"error": ...} body.
 */
public class OpenInferenceProtocolRequestHandler extends HttpRequestHandlerChain {

    static final String METADATA_FILE = "oip-metadata.json";
    private static final String SERVER_METADATA_API = "/v2";
    private static final String SERVER_LIVE_API = "/v2/health/live";
    private static final String SERVER_READY_API = "/v2/health/ready";

    public OpenInferenceProtocolRequestHandler() {}

    @Override
    public void handleRequest(
            ChannelHandlerContext ctx,
            FullHttpRequest req,
            QueryStringDecoder decoder,
            String[] segments)
            throws ModelException, DownloadArchiveException, WorkflowException,
                    WorkerInitializationException {
        String path = String.join("/", segments).trim();
        if (path.equals(SERVER_READY_API)) {
            boolean ready = ModelManager.getInstance().getDefaultModels().values().stream().allMatch(
                    OpenInferenceProtocolRequestHandler::isReady);
            JsonObject response = new JsonObject();
            response.addProperty("ready", ready);
            // The protocol answers "not ready" with a 4xx.
            NettyUtils.sendJsonResponse(ctx, response, ready ? HttpResponseStatus.OK : HttpResponseStatus.BAD_REQUEST);
        } else if (path.equals(SERVER_LIVE_API)) {
            JsonObject response = new JsonObject();
            response.addProperty("live", true);
            NettyUtils.sendJsonResponse(ctx, response);
        } else if (path.equals(SERVER_METADATA_API)) {
            JsonObject response = new JsonObject();
            response.addProperty("name", "Torchserve");
            response.addProperty("version", ConfigManager.getInstance().getVersion());
            JsonArray extensions = new JsonArray();
            extensions.add("binary_tensor_data");
            response.add("extensions", extensions);
            NettyUtils.sendJsonResponse(ctx, response);
        } else if (segments.length >= 4 && "v2".equals(segments[1]) && "models".equals(segments[2])) {
            handleModelRoute(ctx, req, segments);
        } else {
            chain.handleRequest(ctx, req, decoder, segments);
        }
    }

    /** segments: "", "v2", "models", name, ["versions", version], [action]. */
    private void handleModelRoute(ChannelHandlerContext ctx, FullHttpRequest req, String[] segments) {
        String name = segments[3];
        String version = null;
        int next = 4;
        if (segments.length >= 6 && "versions".equals(segments[4])) {
            version = segments[5];
            next = 6;
        }
        String action = segments.length == next ? "" : segments.length == next + 1 ? segments[next] : null;
        if (action == null || !(action.isEmpty() || action.equals("ready"))) {
            if (version != null && ("infer".equals(action) || "explain".equals(action))) {
                sendError(
                        ctx,
                        HttpResponseStatus.NOT_IMPLEMENTED,
                        "inference on a named version is not served: /v2/models/" + name
                                + "/infer serves the default version");
            } else {
                sendError(ctx, HttpResponseStatus.NOT_FOUND, "no such route: " + String.join("/", segments));
            }
            return;
        }
        if (!HttpMethod.GET.equals(req.method())) {
            sendError(ctx, HttpResponseStatus.METHOD_NOT_ALLOWED, req.method() + " is not allowed here: use GET");
            return;
        }
        Model model;
        try {
            model = ModelManager.getInstance().getModel(name, version);
        } catch (ModelVersionNotFoundException e) {
            sendError(ctx, HttpResponseStatus.NOT_FOUND, e.getMessage());
            return;
        }
        if (model == null) {
            sendError(ctx, HttpResponseStatus.NOT_FOUND, "Model not found: " + name);
            return;
        }
        if (action.equals("ready")) {
            sendReadiness(ctx, model);
        } else {
            sendMetadata(ctx, model);
        }
    }

    /**
     * Ready: a worker has the model loaded and can take a request. Not TorchServe's "healthy"
     * (its /ping and gRPC ModelReady), which counts a worker that died and is restarting as
     * healthy for max_retry_timeout_in_sec.
     */
    private static boolean isReady(Model model) {
        return ModelManager.getInstance().getWorkers(model.getModelVersionName()).stream()
                .anyMatch(worker -> worker.getState() == WorkerState.WORKER_MODEL_LOADED);
    }

    private static void sendReadiness(ChannelHandlerContext ctx, Model model) {
        if (isReady(model)) {
            JsonObject response = new JsonObject();
            response.addProperty("name", model.getModelName());
            response.addProperty("ready", true);
            NettyUtils.sendJsonResponse(ctx, response);
        } else {
            // The protocol answers "not ready" with a 4xx.
            sendError(ctx, HttpResponseStatus.BAD_REQUEST, "model " + model.getModelName() + " is not ready");
        }
    }

    private static void sendMetadata(ChannelHandlerContext ctx, Model model) {
        JsonObject response = new JsonObject();
        response.addProperty("name", model.getModelName());
        JsonArray versions = new JsonArray();
        try {
            for (Map.Entry<String, Model> entry :
                    ModelManager.getInstance().getAllModelVersions(model.getModelName())) {
                versions.add(entry.getKey());
            }
        } catch (ModelNotFoundException e) {
            sendError(ctx, HttpResponseStatus.NOT_FOUND, e.getMessage());
            return;
        }
        response.add("versions", versions);
        File file = new File(model.getModelDir(), METADATA_FILE);
        try {
            JsonObject tensors =
                    JsonParser.parseString(Files.readString(file.toPath(), StandardCharsets.UTF_8))
                            .getAsJsonObject();
            for (Map.Entry<String, JsonElement> entry : tensors.entrySet()) {
                response.add(entry.getKey(), entry.getValue());
            }
        } catch (IOException | JsonParseException | IllegalStateException e) {
            sendError(
                    ctx,
                    HttpResponseStatus.INTERNAL_SERVER_ERROR,
                    "the archive of " + model.getModelName() + " has no readable " + METADATA_FILE
                            + " (built by an older build_mar.py?): " + e.getMessage());
            return;
        }
        NettyUtils.sendJsonResponse(ctx, response);
    }

    private static void sendError(ChannelHandlerContext ctx, HttpResponseStatus status, String message) {
        JsonObject response = new JsonObject();
        response.addProperty("error", message);
        NettyUtils.sendJsonResponse(ctx, response, status);
    }
}
